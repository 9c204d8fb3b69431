"""Comparing two models' next-token distributions: the arithmetic every stage shares.

Merge drift (merged vs base+adapter), the export parity gate (artifact vs merged model) and the
bench (artifact vs reference) all score the same things: top-1 agreement and KL(reference ||
other) in nats, per position, after the token prefix every compared sequence shares (a system
prompt and template header would otherwise count once per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ftedge.errors import FtedgeError

TOP_K = 64  # reference tokens kept per position when a reference is stored compactly
EPS = 1e-12


def log_softmax(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Log-softmax over the last axis in ``dtype`` (max-shifted; the sum of exps accumulates in float64)."""
    x = x.astype(dtype, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(dtype)
    return x


def compare_logits(ref_logprobs: Sequence[np.ndarray], other_logits: Sequence[np.ndarray]) -> dict[str, float]:
    """Top-1 agreement and mean KL(ref || other) over all positions of all sequences."""
    agree = 0
    kls: list[np.ndarray] = []
    n = 0
    for ref, oth in zip(ref_logprobs, other_logits, strict=True):
        if ref.shape != oth.shape:
            raise FtedgeError(f"logit shapes differ ({ref.shape} vs {oth.shape}): the artifact's vocabulary does not match the model's")
        lo = log_softmax(oth)
        agree += int((ref.argmax(-1) == lo.argmax(-1)).sum())
        kls.append((np.exp(ref) * (ref - lo)).sum(-1))
        n += ref.shape[0]
    kl = float(np.concatenate(kls).mean()) if kls else float("nan")
    return {"top1": agree / n if n else float("nan"), "kl": max(kl, 0.0), "positions": n}


def scored_from(seqs: Sequence[Sequence[int]]) -> int:
    """First logit row worth scoring: rows before it see only the prefix every sequence shares
    (system prompt, template header), which would otherwise count once per sequence."""
    return max(common_prefix(seqs) - 1, 0)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares (0 for fewer than two)."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = seqs[0][i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def top_k(logp: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Ids and log-probs of the k most likely tokens per row, most likely first."""
    k = min(k, logp.shape[-1])
    idx = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1).astype(np.int32), np.take_along_axis(vals, order, axis=-1).astype(np.float32)


def grouped_kl(ref_ids: np.ndarray, ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || artifact) per position over the reference's top-k tokens plus one bucket for the rest.

    Grouping the tail into one outcome gives a lower bound of the full KL that is tight when the
    top-k tokens hold nearly all of the reference's mass (the usual case for k=64).
    """
    vocab = logp.shape[-1]
    safe = np.minimum(ref_ids, vocab - 1)
    q_logp = np.where(ref_ids < vocab, np.take_along_axis(logp, safe, axis=-1), np.log(EPS))
    p = np.exp(ref_logp.astype(np.float64))
    q = np.exp(q_logp.astype(np.float64))
    head = (p * (ref_logp - q_logp)).sum(axis=-1)
    p_rest = np.clip(1.0 - p.sum(axis=-1), EPS, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=-1), EPS, 1.0)
    return np.maximum(head + p_rest * (np.log(p_rest) - np.log(q_rest)), 0.0)
