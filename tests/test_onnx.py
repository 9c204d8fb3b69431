"""ONNX export (onnxruntime-genai builder + GPTQ) and the ORT GenAI backend, on the tiny random Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ftedge.errors import FtedgeError

pytest.importorskip("onnxruntime_genai")

MESSAGES = [
    [{"role": "system", "content": "Reply with the intent label."}, {"role": "user", "content": "my card has not arrived yet"}],
    [{"role": "user", "content": "what is the exchange rate for pounds?"}],
]
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]
TEXTS = [
    "i lost my card",
    "Why was my top-up declined?! 42 €",
    "  spaces and\nnewlines\t",
    "<|im_start|>user\nhi<|im_end|>\n",
    "naïve café 東京",
]


def _calibration(tokenizer_dir: Path, n: int = 16) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ["card", "arrived", "lost", "rate", "top up", "failed", "stolen", "euro", "when", "why"]
    out = []
    for i in range(n):
        text = " ".join(words[(i * 3 + j) % len(words)] for j in range(6 + i % 5))
        out.append(
            tok.apply_chat_template(
                [{"role": "user", "content": text}, {"role": "assistant", "content": LABELS[i % len(LABELS)]}], tokenize=False
            )
        )
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def torch_ref(tiny_model_dir: Path):
    from ftedge.backends.torch import TorchBackend

    be = TorchBackend(tiny_model_dir, threads=1)
    yield be
    be.close()


@pytest.fixture(scope="module")
def fp32_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ftedge.export.onnx import export_onnx

    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "fp32", "fp32")


@pytest.fixture(scope="module")
def int4_dir(tiny_model_dir: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ftedge.export.onnx import export_onnx

    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "int4", "int4", calibration_texts=_calibration(tokenizer_dir))


def test_fp32_export_folder_and_logits_match_torch(fp32_dir: Path, torch_ref) -> None:
    from ftedge.backends import load_backend

    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "chat_template.jinja"):
        assert (fp32_dir / name).is_file(), name
    assert not [p for p in fp32_dir.parent.iterdir() if p != fp32_dir], "temp or cache folders left beside the output"
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name for p in fp32_dir.iterdir() if p.stat().st_mode & 0o777 != 0o666 & ~mask} == set()  # model.onnx.data too
    with load_backend(fp32_dir, threads=1) as be:
        assert be.name == "ortgenai"
        for msgs in MESSAGES:
            ids = torch_ref.chat_ids(msgs)
            assert be.chat_ids(msgs) == ids
            a, r = be.logits(ids), torch_ref.logits(ids)
            assert a.dtype == np.float32 and a.shape == r.shape
            np.testing.assert_allclose(a, r, atol=2e-4, rtol=1e-3)
        # greedy generation follows the logits, and stops at a stop id
        ids = torch_ref.chat_ids(MESSAGES[0])
        out = list(be.generate(ids, max_new_tokens=6, stop_ids=set()))
        ref = list(torch_ref.generate(ids, max_new_tokens=6, stop_ids=set()))
        assert out == ref and len(out) == 6
        stop = {out[2]}
        assert list(be.generate(ids, max_new_tokens=6, stop_ids=stop)) == out[: out.index(out[2]) + 1]
        assert 2 in be.stop_ids


def test_tokenizer_and_chat_template_match_hf(fp32_dir: Path, torch_ref) -> None:
    from ftedge.backends.ortgenai import OrtGenAIBackend

    with OrtGenAIBackend(fp32_dir, threads=1) as be:
        for text in TEXTS:
            assert be.tokenize(text) == torch_ref.tokenize(text), text
        for msgs in MESSAGES:
            assert be.apply_chat_template(msgs) == torch_ref.apply_chat_template(msgs)
            assert be.apply_chat_template(msgs, add_generation_prompt=False) == torch_ref.apply_chat_template(
                msgs, add_generation_prompt=False
            )
        ids = torch_ref.tokenize("where is my new card")
        assert be.detokenize(ids) == torch_ref.detokenize(ids)


def test_int4_gptq_export_loads_and_roughly_agrees(int4_dir: Path, fp32_dir: Path, torch_ref) -> None:
    import onnx

    from ftedge.backends.ortgenai import OrtGenAIBackend

    proto = onnx.load(str(int4_dir / "model.onnx"), load_external_data=False)
    bits = {n.name: a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits["/lm_head/MatMul_Q8"] == 8 and sum(b == 4 for b in bits.values()) == 2 * 5
    assert any(n.op_type == "GatherBlockQuantized" for n in proto.graph.node)
    size4 = sum(f.stat().st_size for f in int4_dir.glob("model.onnx*"))
    size32 = sum(f.stat().st_size for f in fp32_dir.glob("model.onnx*"))
    assert size4 < size32 / 3
    with OrtGenAIBackend(int4_dir, threads=1) as be:
        for msgs in MESSAGES:
            ids = torch_ref.chat_ids(msgs)
            a, r = be.logits(ids), torch_ref.logits(ids)
            cos = (a * r).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1))
            assert cos.min() > 0.9, cos
            kl = (np.exp(_log_softmax(r)) * (_log_softmax(r) - _log_softmax(a))).sum(-1)
            assert kl.mean() < 0.05, kl


def test_gptq_beats_round_to_nearest() -> None:
    from ftedge.export.gptq import dequantize, gptq, pack_nibbles, pack_zero_points

    rng = np.random.default_rng(0)
    n, k, bs = 48, 128, 32
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = rng.normal(size=(512, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=(512, k))  # correlated inputs
    h = 2 * x.T @ x / len(x)
    q, s, z = gptq(w, h, block_size=bs, symmetric=False)
    wg = dequantize(pack_nibbles(q, bs), s, pack_zero_points(z), n, k, bs)
    assert q.max() <= 15 and wg.shape == w.shape
    # RTN on the same grid: GPTQ's first column of each block uses the same scale; compare output error
    lo, hi = np.minimum(w.reshape(n, -1, bs).min(-1), 0), np.maximum(w.reshape(n, -1, bs).max(-1), 0)
    sr = (hi - lo) / 15
    zr = np.clip(np.round(-lo / sr), 0, 15)
    qr = np.clip(np.round(w.reshape(n, -1, bs) / sr[..., None]) + zr[..., None], 0, 15)
    wr = ((qr - zr[..., None]) * sr[..., None]).reshape(n, k)
    err_g = np.linalg.norm(x @ (wg - w).T)
    err_r = np.linalg.norm(x @ (wr - w).T)
    assert err_g < 0.8 * err_r, (err_g, err_r)


def test_int8_export(tiny_model_dir: Path, tmp_path: Path, torch_ref) -> None:
    from ftedge.backends.ortgenai import OrtGenAIBackend
    from ftedge.export.onnx import export_onnx

    out = export_onnx(tiny_model_dir, tmp_path / "int8", "int8")
    with OrtGenAIBackend(out, threads=1) as be:
        ids = torch_ref.chat_ids(MESSAGES[0])
        a, r = be.logits(ids), torch_ref.logits(ids)
        cos = (a * r).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1))
        assert cos.min() > 0.97


def test_not_an_onnx_folder_is_one_clean_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ftedge.backends.ortgenai import OrtGenAIBackend

    with pytest.raises(FtedgeError) as err:
        OrtGenAIBackend(tiny_model_dir)
    assert "not an ORT GenAI model folder" in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text("{not json")
    with pytest.raises(FtedgeError, match="not a valid ORT GenAI config"):
        OrtGenAIBackend(broken)
    (broken / "genai_config.json").write_text(json.dumps({"model": {"type": "llama", "decoder": {"filename": "model.onnx"}}}))
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(FtedgeError) as err:
        OrtGenAIBackend(broken)
    assert "\n" not in str(err.value)


def test_failed_build_leaves_nothing_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ftedge.export.onnx import export_onnx

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(FtedgeError) as err:
        export_onnx(src, dest / "int4", "int4")
    assert "ONNX builder failed" in str(err.value) and "\n" not in str(err.value)
    assert list(dest.iterdir()) == []
    with pytest.raises(FtedgeError, match="FP16 CPU"):
        export_onnx(src, dest / "fp16", "fp16")
    with pytest.raises(FtedgeError, match="no .safetensors"):
        export_onnx(tmp_path, dest / "x", "fp32") if (tmp_path / "config.json").write_text("{}") else None
    assert list(dest.iterdir()) == []
