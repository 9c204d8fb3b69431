"""GGUF export: f16 conversion, quantization, metadata read-back, the AMX-safe llama.cpp backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import trained_tiny_model

from ftedge.errors import FtedgeError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return trained_tiny_model(tmp_path_factory.mktemp("gguf") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def f16(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ftedge.export.gguf import build_f16

    path, meta = build_f16(model_dir, tmp_path_factory.mktemp("f16") / "model-f16.gguf")
    assert meta == {"chat_template": True, "bos": 1, "eos": 2, "eot": 2}
    return path


@pytest.fixture(scope="module")
def q4_0(f16: Path) -> Path:
    from ftedge.export.gguf import build_quant

    out = f16.parent / "model-q4_0.gguf"
    path, report, meta = build_quant(f16, out, "q4_0", end_of_turn=2, threads=2)
    # 64 and 128 are multiples of 32; only the output/embedding matrix wants q6_k (256-wide blocks)
    assert [f["tensor"] for f in report.fallbacks] in ([], ["token_embd.weight"])
    assert meta["eos"] == 2
    return path


def test_f16_metadata_has_template_and_special_tokens(f16: Path, model_dir: Path) -> None:
    from ftedge.formats.gguf import inspect_gguf

    info = inspect_gguf(f16)
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.token_id("bos") == 1 and info.token_id("eos") == 2
    assert set(info.tensor_types) <= {"F16", "F32"} and not info.quantized
    assert not list(f16.parent.glob(".*tmp*"))


def test_k_quant_falls_back_on_short_rows_and_reports_it(f16: Path) -> None:
    from ftedge.backends.llamacpp import quantize_gguf
    from ftedge.formats.gguf import inspect_gguf

    out = f16.parent / "model-q4_k_m.gguf"
    report = quantize_gguf(f16, out, "q4_k_m", threads=2)
    summary = report.summary()
    assert summary["fallback_tensors"] > 0  # hidden size 64 is not a multiple of 256
    assert all(f["wanted"] in ("q4_k", "q6_k") and f["used"] in ("q5_0", "q8_0") for f in report.fallbacks)
    assert inspect_gguf(out).quantized


def test_unknown_quant_type_lists_valid_ones(f16: Path) -> None:
    from ftedge.backends.llamacpp import quantize_gguf

    with pytest.raises(FtedgeError) as info:
        quantize_gguf(f16, f16.parent / "x.gguf", "q9_9")
    assert "q4_k_m" in str(info.value) and "q8_0" in str(info.value)
    assert not (f16.parent / "x.gguf").exists()


def test_failed_quantization_leaves_no_partial_file(f16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from ftedge.backends.llamacpp import quantize_gguf

    def half_written(src: bytes, dst: bytes, params: object) -> int:
        Path(dst.decode()).write_bytes(b"GGUF" + b"\0" * 100)
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", half_written)
    with pytest.raises(FtedgeError, match="could not quantize"):
        quantize_gguf(f16, f16.parent / "broken.gguf", "q8_0")
    assert not (f16.parent / "broken.gguf").exists()
    assert not [p for p in f16.parent.iterdir() if "broken" in p.name]


def test_backend_matches_hf_template_and_tokenizer(q4_0: Path, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from ftedge.backends.llamacpp import LlamaCppBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo wörld, 123 — ok?"}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with LlamaCppBackend(q4_0, threads=2, n_ctx=256) as b:
        assert b.apply_chat_template(msgs) == expected
        ids = b.tokenize(expected)
        assert ids == tok(expected, add_special_tokens=False)["input_ids"]
        assert 2 in b.stop_ids
        assert b.detokenize(b.tokenize("hello world")) == "hello world"


AMX_SCRIPT = """
import sys
from ftedge.backends.llamacpp import LlamaCppBackend, cpu_has_amx
with LlamaCppBackend(sys.argv[1], threads=2, n_ctx=256) as b:
    ids = b.chat_ids([{"role": "system", "content": "Reply with the intent label."}, {"role": "user", "content": "i lost my card"}])
    logits = b.logits(ids)
    out = list(b.generate(ids, max_new_tokens=16))
    print("amx", cpu_has_amx(), "extra_bufts", b.extra_bufts, "shape", logits.shape, "tokens", len(out), "text", repr(b.detokenize(out)))
"""


def test_quantized_gguf_loads_and_runs_without_the_amx_crash(q4_0: Path) -> None:
    """Runs in a child process: a segfault in ggml's AMX path fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", AMX_SCRIPT, str(q4_0)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-500:]}"
    line = proc.stdout.strip().splitlines()[-1]
    amx = line.split()[1] == "True"
    assert ("extra_bufts False" in line) == amx  # disabled exactly where AMX would crash
    assert "shape (" in line and "49152)" in line
    assert "lost_or_stolen" in line  # the trained answer survives q4_0


def test_missing_or_truncated_gguf_is_one_line_error(f16: Path, tmp_path: Path) -> None:
    from ftedge.backends import load_backend
    from ftedge.backends.llamacpp import LlamaCppBackend

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f16.read_bytes()[: f16.stat().st_size // 2])
    tiny = tmp_path / "header-only.gguf"
    tiny.write_bytes(f16.read_bytes()[:64])
    for path in (truncated, tiny):
        with pytest.raises(FtedgeError, match="truncated"):
            load_backend(path)
    with pytest.raises(FtedgeError, match="not found"):
        LlamaCppBackend(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" * 10)
    with pytest.raises(FtedgeError, match="not a GGUF"):
        LlamaCppBackend(bad)


def test_modelfile_from_gguf_metadata(q4_0: Path, tmp_path: Path) -> None:
    from ftedge.formats.modelfile import write_modelfile

    out = tmp_path / "Modelfile"
    stops = write_modelfile(q4_0, out, system="Reply with the intent label.")
    text = out.read_text()
    assert stops == ["<|im_end|>"]
    assert text.startswith(f"FROM ./{q4_0.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Reply with the intent label."""' in text
    # SmolLM2's ChatML as Ollama's Go template: its default system block when a chat has none, each role's turn, the reply header
    chatml = (
        '<|im_start|>{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}system\n'
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{{ end }}"
        '{{ range .Messages }}{{ if eq .Role "system" }}system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    )
    assert text.count('TEMPLATE """') == 1 and f'TEMPLATE """{chatml}"""\n' in text
    # without a system prompt, the template's own default system prompt is kept
    write_modelfile(q4_0, out)
    assert "You are a helpful AI assistant named SmolLM" in out.read_text()


def test_add_eot_token_rewrites_only_that_key(f16: Path, tmp_path: Path) -> None:
    import shutil

    from ftedge.formats.gguf import add_eot_token, inspect_gguf

    copy = shutil.copy(f16, tmp_path / "eot.gguf")
    before = inspect_gguf(copy)
    add_eot_token(copy, 5)
    after = inspect_gguf(copy)
    assert after.token_id("eot") == 5 and before.token_id("eot") != 5
    assert {k: v for k, v in after.metadata.items() if k != "tokenizer.ggml.eot_token_id"} == {
        k: v for k, v in before.metadata.items() if k != "tokenizer.ggml.eot_token_id"
    }
    assert after.tensor_names == before.tensor_names and after.tensor_types == before.tensor_types
    assert not [p for p in tmp_path.iterdir() if p.name != "eot.gguf"]  # written atomically, nothing left behind


def test_modelfile_system_prompt_reads_back(q4_0: Path, tmp_path: Path) -> None:
    """The SYSTEM line serve reads from a ship/ bundle is the one write_modelfile wrote (both in formats/modelfile.py)."""
    from ftedge.formats.modelfile import read_modelfile_system, write_modelfile

    assert read_modelfile_system(tmp_path) is None  # no Modelfile
    system = "Reply with the intent label.\nOne line only."
    write_modelfile(q4_0, tmp_path / "Modelfile", system=system)
    assert read_modelfile_system(tmp_path) == system
    write_modelfile(q4_0, tmp_path / "Modelfile")
    assert read_modelfile_system(tmp_path) is None


def test_header_reader_agrees_with_gguf_py(f16: Path, q4_0: Path) -> None:
    """inspect_gguf reads the file itself (no vocabulary decoding): same metadata, tensors and special tokens as gguf-py."""
    import gguf

    from ftedge.formats.gguf import inspect_gguf

    for path in (f16, q4_0):
        info = inspect_gguf(path)
        reader = gguf.GGUFReader(path)
        scalars = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):  # gguf-py's own entries for the file header (version, counts), not metadata
                continue
            kind = field.types[0]
            if kind == gguf.GGUFValueType.STRING:
                scalars[name] = bytes(field.parts[field.data[0]]).decode()
            elif kind != gguf.GGUFValueType.ARRAY:
                scalars[name] = field.parts[field.data[0]].tolist()[0]
        assert info.metadata == scalars
        assert info.tensor_names == [t.name for t in reader.tensors]
        types: dict[str, int] = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        assert info.tensor_types == types
        tokens = reader.fields["tokenizer.ggml.tokens"]
        assert info.vocab_size == len(tokens.data)
        for kind in ("bos", "eos"):
            tid = info.token_id(kind)
            assert info.special_texts[kind] == bytes(tokens.parts[tokens.data[tid]]).decode()
