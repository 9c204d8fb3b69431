"""Generative quality for chat data (`messages`, `alpaca`, `completion`): what each artifact actually answers.

Each artifact's worker answers the first N test prompts greedily (``answers``); the parent scores
every answer against the reference answer with chrF (sacrebleu's defaults: character 6-grams,
beta 2, 0-100, higher is closer) and a 95% bootstrap interval over the prompts (``score``), and
the report shows the answers side by side. chrF rewards answers that share wording with the
reference; a correct answer in other words scores lower, so read it next to the answers and the
perplexity, not alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ftedge.backends.base import Backend
from ftedge.bench.metrics import bootstrap_interval

MAX_NEW_TOKENS = 256
RESAMPLES = 500  # corpus chrF per resample: enough for a two-digit interval on a handful of prompts


def budget(backend: Backend, references: Sequence[str]) -> int:
    """Tokens to generate: 1.5x the longest reference answer + 8, at most MAX_NEW_TOKENS."""
    longest = max((len(backend.tokenize(r)) for r in references), default=0)
    return min(MAX_NEW_TOKENS, int(1.5 * longest) + 8)


def answers(backend: Backend, examples: Sequence[dict[str, Any]], *, n_ctx: int) -> list[dict[str, str]]:
    """The greedy answer to each example's prompt (examples with no chat prompt are skipped)."""
    chat = [ex for ex in examples if ex.get("messages")]
    tokens = budget(backend, [str(ex["target"]) for ex in chat])
    out: list[dict[str, str]] = []
    for ex in chat:
        ids = backend.chat_ids(ex["messages"])
        room = min(tokens, n_ctx - len(ids))
        if room <= 0:
            continue
        answer = backend.stream(ids, max_new_tokens=room).text()
        out.append({"prompt": str(ex["messages"][-1]["content"]), "reference": str(ex["target"]), "answer": answer.strip()})
    return out


def score(generations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Corpus chrF of the answers against the references, its bootstrap interval, and each answer's sentence chrF."""
    from sacrebleu.metrics import CHRF

    if not generations:
        return {}
    chrf = CHRF()
    hyps = [str(g["answer"]) for g in generations]
    refs = [str(g["reference"]) for g in generations]

    def corpus(idx: np.ndarray) -> float:
        return float(chrf.corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score)

    interval = bootstrap_interval(len(hyps), corpus, resamples=RESAMPLES)
    return {
        "chrf": round(corpus(np.arange(len(hyps))), 2),
        "chrf_ci": [round(interval[0], 2), round(interval[1], 2)] if interval else None,
        "generations": [
            {**g, "chrf": round(float(chrf.sentence_score(h, [r]).score), 2)} for g, h, r in zip(generations, hyps, refs, strict=True)
        ],
    }
