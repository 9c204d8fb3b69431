"""The loader: base-model resolution (including the GGUF import path on a tiny GGUF written here) and the compute dtype."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from ftedge.basemodel import embedded_gguf
from ftedge.errors import FtedgeError
from ftedge.loader import COMPLETE_MARKER, resolve_base_model


def _resolve_in_child(path: str, queue) -> None:  # pragma: no cover - runs in a child process
    queue.put(str(resolve_base_model(path)))


def test_hf_folder_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve_base_model(str(tiny_model_dir)) == tiny_model_dir


def test_gguf_is_dequantized_once_into_cache(tiny_gguf: Path, tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = resolve_base_model(tiny_gguf)
    assert out.is_relative_to(Path(os.environ["FTEDGE_CACHE"]))
    assert (out / COMPLETE_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    ref = load_file(tiny_model_dir / "model.safetensors")
    got = load_file(out / "model.safetensors")
    for name, tensor in ref.items():
        assert torch.allclose(got[name].float(), tensor.float(), atol=1e-6), name
    mtime = (out / "model.safetensors").stat().st_mtime
    assert resolve_base_model(tiny_gguf) == out
    assert (out / "model.safetensors").stat().st_mtime == mtime  # reused, not rebuilt


def test_concurrent_resolution_builds_one_complete_entry(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())  # a fresh cache folder: both processes race to build it
    os.environ["FTEDGE_CACHE"], old = str(tmp_path / "cache"), os.environ["FTEDGE_CACHE"]
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_resolve_in_child, args=(str(copy), queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert all(p.exitcode == 0 for p in procs)
        results = {queue.get(timeout=5) for _ in procs}
        assert len(results) == 1
        entry = Path(results.pop())
        assert (entry / COMPLETE_MARKER).is_file()
        leftovers = [p.name for p in entry.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        assert leftovers == []
    finally:
        os.environ["FTEDGE_CACHE"] = old


def test_embedded_default_model_is_installed() -> None:
    path = embedded_gguf("smollm2-135m-instruct")
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("missing/file.gguf", "not found"),
        ("not a model id!", "not an alias"),
    ],
)
def test_bad_base_model_specs(spec: str, needle: str) -> None:
    with pytest.raises(FtedgeError, match=needle):
        resolve_base_model(spec)


def test_folder_without_config_or_safetensors(tmp_path: Path) -> None:
    with pytest.raises(FtedgeError, match="not a Hugging Face model folder"):
        resolve_base_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FtedgeError, match="only from safetensors"):
        resolve_base_model(tmp_path)


def test_truncated_gguf_is_one_line_error(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(FtedgeError, match="cannot read .*trunc.gguf"):
        resolve_base_model(bad)
    assert not any(
        p.name.startswith("trunc") and not p.name.startswith(".") for p in (Path(os.environ["FTEDGE_CACHE"]) / "models").iterdir()
    )


def test_hub_id_without_network_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FtedgeError, match="cannot download base model 'someorg/somemodel'"):
        resolve_base_model("someorg/somemodel")


@pytest.mark.parametrize(
    ("features", "native"),
    [
        ({"architecture": "x86_64", "avx2": True, "fma3": True}, False),  # AVX2 (Zen 3): bf16 only emulated
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}, False),  # Skylake
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_bf16": True}, True),  # Zen 4, Cooper Lake
        ({"architecture": "x86_64", "avx512_f": True, "amx_tile": True, "amx_bf16": True}, True),  # Sapphire Rapids
        ({"architecture": "aarch64", "neon": True, "bf16": True}, True),  # Graviton 3, Apple M2
        ({"architecture": "aarch64", "neon": True}, False),
    ],
)
def test_auto_compute_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch, features: dict, native: bool) -> None:
    import torch

    from ftedge.loader import compute_dtype, cpu_supports_bf16

    assert cpu_supports_bf16(features) is native
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype("float32", cpu) == torch.float32 and compute_dtype("bfloat16", cpu) == torch.bfloat16
