"""Batched teacher-forced logits (Backend.logits_batch, backends.torch.batched_logits) equal one row at a time:
the torch backend, the bench's quality pass, the export gate's reference and the merge drift pass."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from helpers import ROWS, SYSTEM, make_adapter

from ftedge.logits import log_softmax

TOL = 1e-4  # log-softmax, float32 tiny model


def _rows(n: int = 7, vocab: int = 200, seed: int = 0) -> list[list[int]]:
    """Token-id rows of different lengths (3 .. 40), not sorted by length."""
    rng = np.random.default_rng(seed)
    lengths = [17, 3, 40, 9, 25, 3, 31][:n]
    return [rng.integers(3, vocab, size=n_).tolist() for n_ in lengths]


def _assert_same(batched: list[np.ndarray], per_row: list[np.ndarray]) -> None:
    assert len(batched) == len(per_row)
    for b, p in zip(batched, per_row, strict=True):
        assert b.shape == p.shape
        lb, lp = log_softmax(b), log_softmax(p)
        assert float(np.abs(lb - lp).max()) < TOL
        assert (lb.argmax(axis=-1) == lp.argmax(axis=-1)).all()


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):
    from ftedge.backends.torch import TorchBackend

    with TorchBackend(tiny_model_dir, threads=1) as b:
        yield b


def test_torch_batches_equal_rows_of_different_lengths(backend) -> None:
    from ftedge.backends.torch import batched_logits

    rows = _rows(vocab=backend.vocab_size)
    per_row = [backend.logits(r) for r in rows]
    _assert_same(backend.logits_batch(rows), per_row)
    # several batches (rows x longest <= 64 tokens), and a start position
    _assert_same(batched_logits(backend.model, rows, max_tokens=64), per_row)
    _assert_same(backend.logits_batch(rows, start=2), [p[2:] for p in per_row])


def test_base_class_default_is_per_row(backend) -> None:
    from ftedge.backends.base import Backend

    rows = _rows(vocab=backend.vocab_size)
    default = Backend.logits_batch(backend, rows, start=1)  # the loop llama.cpp and ORT run
    for d, r in zip(default, rows, strict=True):
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, backend.logits(r)[1:])


def test_batches_are_sorted_and_bounded() -> None:
    from ftedge.backends.base import length_batches, token_windows

    lengths = [17, 3, 40, 9, 25, 3, 31, 100]
    batches = length_batches(lengths, max_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)
    windows = token_windows(lengths, max_tokens=64)
    assert [i for w in windows for i in w] == list(range(len(lengths)))
    assert all(len(w) == 1 or sum(lengths[i] for i in w) <= 64 for w in windows)


class _PerRow:
    """The backend's per-row path: Backend.logits_batch's default loop."""

    def __init__(self, backend) -> None:
        self._b = backend

    def __getattr__(self, name: str):
        return getattr(self._b, name)

    def logits_batch(self, rows, *, start: int = 0):
        from ftedge.backends.base import Backend

        return Backend.logits_batch(self._b, rows, start=start)


def test_quality_pass_batched_equals_per_row(tmp_path: Path, confident_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftedge.backends.base import token_windows
    from ftedge.backends.torch import TorchBackend
    from ftedge.bench import measures
    from ftedge.formats.logits_cache import read_topk_cache

    rows = [*ROWS, ("why " * 120, "card_arrival"), ("rate", "exchange_rate")]  # a row too long for n_ctx, a short one
    examples = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}], "target": lab} for t, lab in rows]
    # windows of ~100 tokens: several windows, the skipped row inside one
    monkeypatch.setattr(measures, "token_windows", functools.partial(token_windows, max_tokens=100))
    with TorchBackend(confident_model_dir, threads=1) as b:
        out = {}
        for name, backend in (("batched", b), ("per_row", _PerRow(b))):
            out[name] = measures.measure_quality(
                backend,
                examples,
                task="label_match",
                n_ctx=128,
                reference_out=tmp_path / f"{name}.npz",
                reference_in=tmp_path / "batched.npz",
            )
    batched, per_row = out["batched"], out["per_row"]
    assert batched["skipped_examples"] == per_row["skipped_examples"] == 1
    assert batched["predictions"] == per_row["predictions"]
    assert any(not p["decoded"] for p in batched["predictions"])  # teacher-forced answers taken from the batched pass
    np.testing.assert_allclose([n for n, _ in batched["nll"]], [n for n, _ in per_row["nll"]], rtol=1e-5, atol=1e-5)
    assert [t for _, t in batched["nll"]] == [t for _, t in per_row["nll"]]
    assert per_row["top1_agreement"] == 1.0 and per_row["kl"] < 1e-6  # per-row scored against the batched reference
    a, c = (
        read_topk_cache(tmp_path / "batched.npz", measures.REFERENCE_KIND),
        read_topk_cache(tmp_path / "per_row.npz", measures.REFERENCE_KIND),
    )
    for i in range(len(a)):
        np.testing.assert_array_equal(a.top_ids[i][:, 0], c.top_ids[i][:, 0])
        np.testing.assert_allclose(a.top_logp[i], c.top_logp[i], atol=TOL)


def test_gate_reference_batched_equals_per_row(tiny_model_dir: Path) -> None:
    from ftedge.backends.torch import TorchBackend
    from ftedge.data.prompts import Prompt
    from ftedge.export.gate import build_reference

    prompts = [Prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}], lab) for t, lab in ROWS]
    reference = build_reference(tiny_model_dir, prompts, threads=1, stop_bound=4)
    assert len({len(i) for i in reference.ids}) > 1  # rows of different lengths
    with TorchBackend(tiny_model_dir, threads=1) as b:
        per_row = [log_softmax(b.logits(s))[reference.start :].astype(np.float32) for s in reference.ids]
    for got, want in zip(reference.logprobs, per_row, strict=True):
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) < TOL
        assert (got.argmax(axis=-1) == want.argmax(axis=-1)).all()


def test_merge_drift_batched_equals_per_row(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from ftedge.backends import torch as torch_backend
    from ftedge.loader import attach_adapter, load_causal_lm, load_tokenizer
    from ftedge.merge import measure_drift
    from ftedge.recipe import QuantConfig

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.5)
    tokenizer = load_tokenizer(tiny_model_dir, require_chat_template=False)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) + lab for t, lab in ROWS
    ]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    # the model merge runs it on: base + adapter, unmerged (peft)
    model = attach_adapter(load_causal_lm(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")), adapter).eval()
    with torch.inference_mode():
        per_row = [model(input_ids=torch.tensor([s])).logits[0].float().numpy() for s in ids]
    _assert_same(torch_backend.batched_logits(model, ids, max_tokens=64), per_row)

    # measure_drift's figures: batched vs one row at a time
    def drift() -> dict:
        return measure_drift(tiny_model_dir, adapter, ["float"], texts, quant=QuantConfig(), four_bit=False, tokenizer=tokenizer)[0][
            "float"
        ]

    batched = drift()
    one_at_a_time = torch_backend.batched_logits
    monkeypatch.setattr(torch_backend, "batched_logits", lambda m, rows, **kw: [one_at_a_time(m, [r], **kw)[0] for r in rows])
    per_row_figures = drift()
    assert batched["positions"] == per_row_figures["positions"] > 0
    assert batched["top1"] == per_row_figures["top1"]
    assert batched["kl"] == pytest.approx(per_row_figures["kl"], abs=1e-5)


def test_batch_tokens_bound_the_logits_of_one_pass() -> None:
    from ftedge.backends.base import BATCH_TOKENS, LOGIT_FLOATS, batch_tokens

    assert batch_tokens(1000) == BATCH_TOKENS  # a small vocabulary: the token cap decides
    for vocab in (49_152, 151_936, 262_144):
        n = batch_tokens(vocab)
        assert n * vocab <= LOGIT_FLOATS < (n + 1) * vocab
    assert batch_tokens(10**12) == 1  # never zero: a row still runs alone
