"""Task metrics from every (gold answer, model answer) pair of a bench: scikit-learn does the arithmetic.

Computed in the bench's parent process from what each artifact's worker returns (every pair, and
each example's answer negative log-likelihood), so all artifacts are scored by the same code:

- ``classification``: accuracy with a 95% percentile-bootstrap interval (fixed seed), macro-F1 over
  the gold labels, per-label precision / recall / F1 / support, and the most frequent confusions;
- ``perplexity_interval``: a bootstrap interval of the answer perplexity, resampling examples;
- ``f1_movers``: the labels whose F1 moved most between the reference and an artifact.

An answer that is no gold label (free text, a truncated label) counts against its gold label's
recall and is listed as a confusion, but is not a class of its own in macro-F1.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SEED = 0
RESAMPLES = 2000
CONFIDENCE = 0.95
TOP_CONFUSIONS = 10


def bootstrap_interval(
    n: int, statistic: Callable[[np.ndarray], float], *, seed: int = SEED, resamples: int = RESAMPLES
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of ``statistic(indices)`` over ``n`` examples resampled with replacement (scipy)."""
    if n < 2:
        return None
    from scipy.stats import bootstrap

    with warnings.catch_warnings():  # every resample equal (100% accuracy): a zero-width interval, no warning
        warnings.simplefilter("ignore")
        res = bootstrap(
            (np.arange(n),),
            lambda idx: statistic(idx.astype(np.int64)),
            n_resamples=resamples,
            confidence_level=CONFIDENCE,
            method="percentile",
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        value = float(statistic(np.arange(n)))
        return value, value
    return lo, hi


def classification(pairs: Sequence[tuple[str, str]], *, seed: int = SEED) -> dict[str, Any]:
    """Accuracy (+ 95% bootstrap interval), macro-F1, per-label P/R/F1 and the top confusions of (gold, answer) pairs."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    if not pairs:
        return {}
    gold = [str(g).strip() for g, _ in pairs]
    pred = [str(a).strip() for _, a in pairs]
    labels = sorted(set(gold))
    correct = np.asarray([g == p for g, p in zip(gold, pred, strict=True)], dtype=np.float64)
    interval = bootstrap_interval(len(correct), lambda idx: float(correct[idx].mean()), seed=seed)
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    per_label = {
        label: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
    }
    confusions = Counter((g, p) for g, p in zip(gold, pred, strict=True) if g != p)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "accuracy_ci": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
        "macro_f1": round(float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)), 4),
        "per_label": per_label,
        "confusions": [{"gold": g, "predicted": p, "count": c} for (g, p), c in confusions.most_common(TOP_CONFUSIONS)],
    }


def perplexity_interval(nll: Sequence[tuple[float, int]], *, seed: int = SEED) -> list[float] | None:
    """95% bootstrap interval of exp(sum nll / sum tokens), resampling examples (``nll``: per-example (sum, tokens))."""
    arr = np.asarray(nll, dtype=np.float64).reshape(-1, 2)
    if len(arr) < 2 or arr[:, 1].sum() <= 0:
        return None

    def ppl(idx: np.ndarray) -> float:
        tokens = arr[idx, 1].sum()
        return float(np.exp(arr[idx, 0].sum() / tokens)) if tokens else float("nan")

    interval = bootstrap_interval(len(arr), ppl, seed=seed)
    return [round(interval[0], 4), round(interval[1], 4)] if interval else None


def f1_movers(reference: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` labels whose F1 changed most from ``reference`` to ``other`` (both ``per_label`` dicts), largest change first."""
    moves = []
    for label in sorted(set(reference) & set(other)):
        ref_f1, f1 = reference[label]["f1"], other[label]["f1"]
        if ref_f1 != f1:
            moves.append(
                {"label": label, "reference_f1": ref_f1, "f1": f1, "delta": round(f1 - ref_f1, 4), "support": other[label]["support"]}
            )
    moves.sort(key=lambda m: (-abs(m["delta"]), m["label"]))
    return moves[:k]
