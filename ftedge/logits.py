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
from ftedge.formats.quants import CONFIDENT_MARGIN

TOP_K = 64  # reference tokens kept per position when a reference is stored compactly
EPS = 1e-12


def log_softmax(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Log-softmax over the last axis in ``dtype`` (max-shifted; the sum of exps accumulates in float64)."""
    x = x.astype(dtype, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(dtype)
    return x


def compare_logits(
    ref_logprobs: Sequence[np.ndarray], other_logits: Sequence[np.ndarray], *, confident_margin: float = CONFIDENT_MARGIN
) -> dict[str, float]:
    """How closely ``other`` follows the reference, over all positions of all sequences.

    ``top1``: raw top-1 agreement; ``kl`` / ``kl_p99`` / ``kl_max``: mean, 99th percentile and maximum of the
    per-position KL(ref || other) in nats; ``top1_confident``: top-1 agreement on the positions where the
    reference's top token leads its runner-up by at least ``confident_margin`` nats of log-probability
    (``confident_positions`` of them; NaN when none). Raw top-1 flips wherever the reference is near-tied, however
    faithful ``other`` is; on confident positions a flip means ``other`` really answers differently.
    """
    agree = agree_conf = n_conf = 0
    kls: list[np.ndarray] = []
    n = 0
    for ref, oth in zip(ref_logprobs, other_logits, strict=True):
        if ref.shape != oth.shape:
            raise FtedgeError(f"logit shapes differ ({ref.shape} vs {oth.shape}): the artifact's vocabulary does not match the model's")
        lo = log_softmax(oth)
        same = ref.argmax(-1) == lo.argmax(-1)
        confident = top_margin(ref) >= confident_margin
        agree += int(same.sum())
        agree_conf += int((same & confident).sum())
        n_conf += int(confident.sum())
        kls.append(np.maximum((np.exp(ref) * (ref - lo)).sum(-1), 0.0))
        n += ref.shape[0]
    per = np.concatenate(kls) if kls else np.zeros(0)
    nan = float("nan")
    return {
        "top1": agree / n if n else nan,
        "kl": float(per.mean()) if n else nan,
        "kl_p99": float(np.percentile(per, 99)) if n else nan,
        "kl_max": float(per.max()) if n else nan,
        "top1_confident": agree_conf / n_conf if n_conf else nan,
        "confident_positions": n_conf,
        "positions": n,
    }


def top_margin(logp: np.ndarray) -> np.ndarray:
    """Per row, how far the top token leads the runner-up (a difference of logits = of log-probs, in nats)."""
    if logp.shape[-1] < 2:
        return np.full(logp.shape[:-1], np.inf)
    two = -np.partition(-logp, 1, axis=-1)[..., :2]
    return two[..., 0] - two[..., 1]


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
