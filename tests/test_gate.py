"""Parity gate: logit agreement, thresholds, tokenizer consistency, stop test, a broken artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import SYSTEM, trained_tiny_model

from ftedge.data import Prompt
from ftedge.export.gate import thresholds_for
from ftedge.logits import compare_logits, log_softmax


def test_compare_logits_identical_and_different() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 10)).astype(np.float32)
    same = compare_logits([log_softmax(a)], [a])
    assert same["top1"] == 1.0 and same["kl"] < 1e-9 and same["positions"] == 5
    other = compare_logits([log_softmax(a)], [-a])
    assert other["top1"] == 0.0 and other["kl"] > 0.5


def test_thresholds_from_target_then_defaults(tmp_path: Path) -> None:
    from helpers import tiny_target

    target = tiny_target(tmp_path, ["q4_0"], gates={"q4_0": {"min_top1": 0.5, "max_kl": 2.0}})
    assert thresholds_for("q4_0", target) == {"min_top1": 0.5, "max_kl": 2.0}
    assert thresholds_for("f16", target) == {"min_top1": 0.99, "max_kl": 0.01}
    assert thresholds_for("q8_0")["min_top1"] == 0.97
    assert thresholds_for("q4_k_m")["min_top1"] == 0.85


PROMPTS = [
    Prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], label)
    for text, label in [
        ("i lost my card", "lost_or_stolen_card"),
        ("rate for pounds", "exchange_rate"),
        ("my top up failed", "top_up_failed"),
    ]
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    from helpers import make_tiny_model

    from ftedge.export.gate import build_reference
    from ftedge.export.gguf import build_f16, build_quant

    root = tmp_path_factory.mktemp("parity")
    model = trained_tiny_model(root / "model", tokenizer_dir)
    f16, _ = build_f16(model, root / "model-f16.gguf")
    q8, _, _ = build_quant(f16, root / "model-q8_0.gguf", "q8_0", end_of_turn=2, threads=2)
    # a deliberately broken artifact: same architecture and vocabulary, other (random) weights
    other = make_tiny_model(root / "other", tokenizer_dir, seed=1)
    broken, _ = build_f16(other, root / "broken-f16.gguf")
    reference = build_reference(model, PROMPTS, threads=2, stop_bound=32)
    return reference, f16, q8, broken


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
        assert gate["top1"] >= thresholds_for(quant)["min_top1"]
        assert gate["tokenizer"]["mismatches"] == 0 and gate["tokenizer"]["chat_template_mismatches"] == 0
        assert gate["stop"]["stopped"] and gate["stop"]["tokens"] <= gate["stop"]["bound"]
        assert gate["n_prompts"] == 3


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
    assert result["mismatches"] == 3
    assert result["examples"][0]["position"] == 0
