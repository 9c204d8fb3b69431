"""Parity gate: logit agreement, thresholds, tokenizer consistency, stop test, a broken artifact."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import ROWS, SYSTEM

from ftedge.data.prompts import Prompt
from ftedge.export.gate import thresholds_for
from ftedge.logits import compare_logits, log_softmax


def test_compare_logits_identical_and_different() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 10)).astype(np.float32)
    same = compare_logits([log_softmax(a)], [a])
    assert same["top1"] == 1.0 and same["kl"] < 1e-9 and same["positions"] == 5
    other = compare_logits([log_softmax(a)], [-a])
    assert other["top1"] == 0.0 and other["kl"] > 0.5


def test_compare_logits_judges_confident_positions_and_the_kl_tail() -> None:
    # two positions: one near-tied (margin 0.01 nat), one confident (margin 3 nats); the other flips the near tie only
    ref = np.array([[1.0, 0.99, -5.0], [3.0, 0.0, -5.0]], dtype=np.float32)
    other = np.array([[0.99, 1.0, -5.0], [3.0, 0.0, -5.0]], dtype=np.float32)
    f = compare_logits([log_softmax(ref)], [other])
    assert f["top1"] == 0.5 and f["confident_positions"] == 1 and f["top1_confident"] == 1.0
    assert f["kl"] < 1e-3 and f["kl_max"] >= f["kl_p99"] >= f["kl"]
    flipped = compare_logits([log_softmax(ref)], [other[:, [1, 0, 2]]])  # the confident position flips too
    assert flipped["top1_confident"] == 0.0 and flipped["kl_max"] > 1.0


def test_thresholds_from_target_then_defaults(tmp_path: Path) -> None:
    from helpers import tiny_target

    from ftedge.formats.quants import DEFAULT_GATES

    target = tiny_target(tmp_path, ["q4_0"], gates={"q4_0": {"min_top1_confident": 0.5, "max_kl": 2.0}})
    assert thresholds_for("q4_0", target) == {"min_top1_confident": 0.5, "max_kl": 2.0, "max_kl_p99": DEFAULT_GATES["q4_0"].max_kl_p99}
    assert thresholds_for("f16", target) == {"max_kl": 0.005, "max_kl_p99": 0.05, "min_top1_confident": 0.99}
    # looser with fewer bits, as llama.cpp's KL-divergence figures are
    order = ["f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]
    for stricter, looser in zip(order, order[1:], strict=False):
        a, b = thresholds_for(stricter), thresholds_for(looser)
        assert a["max_kl"] < b["max_kl"] and a["max_kl_p99"] <= b["max_kl_p99"] and a["min_top1_confident"] > b["min_top1_confident"]


def test_old_gate_keys_fail_with_what_to_write_instead(tmp_path: Path) -> None:
    from ftedge.errors import FtedgeError
    from ftedge.targets import load_target

    path = tmp_path / "old.yaml"
    path.write_text("name: old\ngates:\n  q8_0: {min_top1: 0.97, max_kl: 0.03}\n")
    with pytest.raises(FtedgeError, match=r"gates.q8_0: `min_top1` is no longer a gate key: write min_top1_confident") as err:
        load_target(path)
    assert "\n" not in err.value.one_line()
    path.write_text("name: new\ngates:\n  q8_0: {max_kl: 0.03}\n")  # max_kl kept its meaning
    assert thresholds_for("q8_0", load_target(path))["max_kl"] == 0.03


# every row the tiny model was trained on: enough confident positions (>= MIN_CONFIDENT_POSITIONS) for the top-1 check
PROMPTS = [Prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], label) for text, label in ROWS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, confident_model_dir: Path, confident_ggufs: dict[str, Path]):
    """The reference: the tiny model trained on PROMPTS' rows, confident on them (margins > 1 nat) as tuned models are."""
    from tiny_models import make_tiny_model

    from ftedge.export.gate import build_reference
    from ftedge.export.gguf import build_f16

    root = tmp_path_factory.mktemp("parity")
    # a deliberately broken artifact: same architecture and vocabulary, other (random) weights
    other = make_tiny_model(root / "other", tokenizer_dir, seed=1)
    broken, _ = build_f16(other, root / "broken-f16.gguf")
    reference = build_reference(confident_model_dir, PROMPTS, threads=2, stop_bound=32)
    return reference, confident_ggufs["f16"], confident_ggufs["q8_0"], broken


def test_reference_skips_the_shared_prefix_and_stops(setup) -> None:
    reference = setup[0]
    assert reference.start > 10  # the system prompt is scored once, not per prompt
    assert all(lp.shape[0] == len(ids) - reference.start for lp, ids in zip(reference.logprobs, reference.ids, strict=True))
    assert reference.reference_stop["stopped"]


def test_faithful_artifacts_pass(setup) -> None:
    from ftedge.export.gate import gate_artifact

    reference, f16, q8, _ = setup
    for path, quant in ((f16, "f16"), (q8, "q8_0")):
        gate = gate_artifact(path, reference, quant, threads=2, n_ctx=256)
        assert gate["passed"], gate["reasons"]
        assert gate["top1_checked"] and gate["top1_confident"] >= thresholds_for(quant)["min_top1_confident"]
        assert gate["kl"] <= gate["kl_p99"] <= gate["kl_max"] < thresholds_for(quant)["max_kl_p99"]
        assert gate["runtime"]["flash_attn"] is False and gate["runtime"]["threads"] == 2
        assert gate["tokenizer"]["mismatches"] == 0 and gate["tokenizer"]["chat_template_mismatches"] == 0
        assert gate["stop"]["stopped"] and gate["stop"]["tokens"] <= gate["stop"]["bound"]
        assert gate["n_prompts"] == len(PROMPTS)


def test_broken_artifact_fails_with_figures(setup) -> None:
    from ftedge.export.gate import gate_artifact

    reference, _, _, broken = setup
    gate = gate_artifact(broken, reference, "f16", threads=2, n_ctx=256)
    assert not gate["passed"]
    assert gate["top1"] < 0.5 and gate["kl"] > 0.01
    assert any("top-1" in r for r in gate["reasons"])
    assert not gate["stop"]["passed"]  # random weights never produce <|im_end|>
    assert gate["tokenizer"]["passed"]  # same tokenizer: only the weights are wrong


def test_tokenizer_mismatch_is_reported(setup) -> None:
    from ftedge.backends.llamacpp import LlamaCppBackend
    from ftedge.export.gate import tokenizer_check

    reference, f16, _, _ = setup

    class DropsFirstToken(LlamaCppBackend):
        def tokenize(self, text: str) -> list[int]:
            return super().tokenize(text)[1:]

    with DropsFirstToken(f16, threads=2, n_ctx=256) as backend:
        result = tokenizer_check(backend, reference)
    assert not result["passed"]
    assert result["mismatches"] == len(PROMPTS)
    assert result["examples"][0]["position"] == 0


@pytest.fixture(scope="module")
def barely_trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, setup):
    """A barely-trained adapter: the tiny random model (its next tokens near-tied everywhere) + a small LoRA, merged."""
    import torch
    from helpers import make_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftedge.export.gate import build_reference
    from ftedge.export.gguf import build_f16, build_quant

    root = tmp_path_factory.mktemp("barely")
    adapter = make_adapter(tiny_model_dir, root / "adapter", scale=0.05)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(root / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "merged")
    f16, _ = build_f16(root / "merged", root / "merged-f16.gguf")
    quants = {q: build_quant(f16, root / f"merged-{q}.gguf", q, end_of_turn=2, threads=2)[0] for q in ("q8_0", "q4_0")}
    damaged = setup[3]  # the same architecture and tokenizer, other weights
    return build_reference(root / "merged", PROMPTS, threads=2, stop_bound=8), quants, damaged


def test_faithful_quants_of_a_barely_trained_adapter_pass(barely_trained) -> None:
    """Issue 17: near-tied reference logits made faithful artifacts fail on raw top-1; KL judges them, and they pass."""
    from ftedge.export.gate import gate_artifact

    reference, quants, _ = barely_trained
    for quant, old_min_top1 in (("q8_0", 1.0), ("q4_0", 0.85)):  # q4_0: the old built-in gate (min_top1 0.85)
        gate = gate_artifact(quants[quant], reference, quant, threads=2, n_ctx=256)
        assert gate["passed"], (quant, gate["reasons"])
        assert gate["top1"] < old_min_top1, (quant, gate["top1"])  # near ties resolved the other way: raw top-1 misses
        assert gate["kl_p99"] < thresholds_for(quant)["max_kl_p99"] / 10
        assert gate["confident_positions"] < 20 and not gate["top1_checked"]  # a near-tied reference: judged by KL


def test_damaged_artifact_of_a_barely_trained_adapter_fails(barely_trained) -> None:
    from ftedge.export.gate import gate_artifact

    reference, _, damaged = barely_trained
    for quant in ("f16", "q8_0"):  # judged even as a q8_0, other weights are not a faithful copy
        gate = gate_artifact(damaged, reference, quant, threads=2, n_ctx=256)
        assert not gate["passed"]
        assert any("KL" in r for r in gate["reasons"]), gate["reasons"]


# -- the damage matrix: each artifact below is wrong in one way, and the gate says how, with figures ------------------
def _copy_with(src: Path, out: Path, *, template: str | None = None, scale: tuple[str, float] | None = None) -> Path:
    """A copy of the HF folder ``src`` with another chat template, or with the weight matrices under a prefix scaled."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    if template is not None:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    if scale is not None:
        prefix, factor = scale
        tensors = load_file(str(out / "model.safetensors"))
        names = [n for n, t in tensors.items() if n.startswith(prefix) and t.ndim == 2]
        assert names, sorted(tensors)
        for name in names:
            tensors[name] = tensors[name] * factor
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


DAMAGES = ["other-chat-template", "q2_k-judged-as-q8_0", "onnx-of-other-weights", "one-layer-scaled"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, confident_model_dir: Path, confident_ggufs, setup):
    """damage -> (artifact, the quant it is judged as, the reference it is judged against)."""
    from tiny_models import TEMPLATES, make_tiny_model, trained_tiny_model

    from ftedge.export.gate import build_reference
    from ftedge.export.gguf import build_f16, build_quant
    from ftedge.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("damaged")
    reference = setup[0]  # the confident tiny model's
    llama3 = TEMPLATES.joinpath("llama3.jinja").read_text(encoding="utf-8")
    other_template = build_f16(_copy_with(confident_model_dir, root / "template", template=llama3), root / "template-f16.gguf")[0]
    # a real q2_k needs rows as wide as llama.cpp's 256-wide k-quant blocks (at hidden 64 every tensor falls back to q4/q5/q8)
    wide = trained_tiny_model(root / "wide", tokenizer_dir, sharpen=3.0, hidden_size=256, intermediate_size=512)
    wide_f16 = build_f16(wide, root / "wide-f16.gguf")[0]
    q2_k = build_quant(wide_f16, root / "wide-q2_k.gguf", "q2_k", end_of_turn=2, threads=2)[0]
    wide_reference = build_reference(wide, PROMPTS, threads=2, stop_bound=32)
    other = make_tiny_model(root / "other", tokenizer_dir, seed=1)  # same architecture and vocabulary, other weights
    onnx = export_onnx(other, root / "onnx-fp32", "fp32")
    scaled = build_f16(_copy_with(confident_model_dir, root / "scaled", scale=("model.layers.0.", 1.5)), root / "scaled-f16.gguf")[0]
    return {
        "other-chat-template": (other_template, "f16", reference),
        "q2_k-judged-as-q8_0": (q2_k, "q8_0", wide_reference),
        "onnx-of-other-weights": (onnx, "fp32", reference),
        "one-layer-scaled": (scaled, "f16", reference),
    }


def _figure(reasons: list[str], pattern: str) -> float:
    """The number a reason line reports (``pattern`` holds one group around it)."""
    import re

    found = [re.fullmatch(pattern, r) for r in reasons]
    hits = [float(m.group(1)) for m in found if m]
    assert len(hits) == 1, (pattern, reasons)
    return hits[0]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_artifacts_fail_with_figures(damage: str, damaged) -> None:
    from ftedge.export.gate import gate_artifact

    path, quant, reference = damaged[damage]
    gate = gate_artifact(path, reference, quant, threads=2, n_ctx=256)
    th = thresholds_for(quant)
    assert not gate["passed"] and gate["thresholds"] == th
    n = len(PROMPTS)
    assert gate["n_prompts"] == n and gate["top1_checked"]  # a confident reference: top-1 is judged too
    kl_line = r"mean KL (\d+\.\d{4}) > " + re.escape(str(th["max_kl"]))
    p99_line = r"p99 KL (\d+\.\d{4}) > " + re.escape(str(th["max_kl_p99"]))
    top1_line = r"top-1 (\d\.\d{3}) < " + re.escape(str(th["min_top1_confident"]))
    top1_line += rf" on the {gate['confident_positions']} confident positions"
    if damage == "other-chat-template":
        # the weights are the reference's: the logits agree; the template renders every chat differently
        assert gate["kl"] < th["max_kl"] and gate["top1_confident"] == 1.0
        assert gate["tokenizer"]["mismatches"] == 0 and gate["tokenizer"]["chat_template_mismatches"] == n
        assert gate["reasons"] == [f"tokenizer: 0 id / {n} template mismatches"]
        return
    assert gate["tokenizer"]["passed"]  # the rest are damaged weights with the right tokenizer and template
    assert _figure(gate["reasons"], kl_line) == pytest.approx(gate["kl"], abs=1e-4) and gate["kl"] > th["max_kl"]
    assert _figure(gate["reasons"], p99_line) == pytest.approx(gate["kl_p99"], abs=1e-4) and gate["kl_p99"] > th["max_kl_p99"]
    if damage == "q2_k-judged-as-q8_0":
        # within what a q2_k may lose, beyond a q8_0's: the same file judged as a q2_k passes
        assert gate["kl"] < thresholds_for("q2_k")["max_kl"]
        assert gate_artifact(path, reference, "q2_k", threads=2, n_ctx=256)["passed"]
    elif damage == "onnx-of-other-weights":
        # another model: no confident answer survives, and it never ends a turn
        assert gate["top1_confident"] == 0.0 and _figure(gate["reasons"], top1_line) == 0.0
        assert not gate["stop"]["passed"] and f"no end-of-turn within {gate['stop']['bound']} tokens" in gate["reasons"]
    else:  # layer 0's matrices 1.5x: every later position drifts, some confident answers flip
        assert gate["top1_confident"] < th["min_top1_confident"]
        assert _figure(gate["reasons"], top1_line) == pytest.approx(gate["top1_confident"], abs=1e-3)
        assert gate["stop"]["passed"]
