"""Drift from base: what tuning cost the model away from the user's task (a forgetting check).

Each artifact is compared with the *untuned* base model on general prompts and text that are
not the user's task: ``general.jsonl`` beside this module (40 everyday prompts, each with a
short written answer, and six paragraphs; written for ftedge, Apache-2.0 like the code) plus,
optionally, the user's own file (recipe key ``eval.general_prompts``, same JSON-lines shape:
``{"prompt": ..., "answer": ...}``, ``{"messages": [...]}`` or ``{"text": ...}``; the answer, or
a final assistant turn, is optional).

- The base model runs once, in its own bench worker (``base_reference``): each general prompt
  (chat template, no system prompt) followed by its answer (the written one, else the base's own
  greedy reply), and the base's top-k next-token log-probs over that answer, are saved with the
  token ids of everything, so every artifact is scored on exactly the same tokens (ftedge's
  artifacts of one model share its vocabulary). Written answers keep this to one forward pass
  per prompt.
- Each artifact's worker (``drift``) scores the same token sequences: mean KL(base || artifact)
  and top-1 agreement with the base over the answer positions, and the perplexity of the general
  text, set against the base's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftedge.backends.base import Backend
from ftedge.errors import FtedgeError
from ftedge.formats.general_set import GeneralSet, read_general
from ftedge.formats.logits_cache import TopKCache, read_topk_cache, write_topk_cache
from ftedge.logits import grouped_kl, log_softmax, top_k

log = logging.getLogger(__name__)

GENERAL_FILE = Path(__file__).resolve().parent / "general.jsonl"
REPLY_TOKENS = 32
BASE_KIND = "drift-base"  # the top-k cache the base model's worker writes (ftedge.formats.logits_cache)
NOTE = (
    "drift from base: each artifact against the untuned base model on general prompts that are not your task "
    "(with short written answers, teacher-forced): KL(base || artifact) in nats and top-1 agreement per answer "
    "token, and the perplexity of general text (`gen. ppl`; the base's is given above the table). Tuning always "
    "moves a model; the reference's drift is what tuning cost, an artifact's drift beyond the reference's is what "
    "export and quantization added (a QLoRA reference runs on the 4-bit base, so its own drift includes that "
    "rounding). General-text perplexity well above the base's, or top-1 agreement far below the reference's, "
    "means the model lost general ability (catastrophic forgetting): check that it still does what you need "
    "besides your task."
)


def load_general(extra: Path | None = None) -> GeneralSet:
    """ftedge's shipped general set, plus the user's ``extra`` file when given."""
    general = read_general(GENERAL_FILE)
    general.sources[-1] = "ftedge general set"
    if extra is not None:
        read_general(Path(extra), general)
    return general


# -- in the worker: the base ----------------------------------------------------------------
def base_reference(backend: Backend, general: dict[str, Any], out: Path, *, n_ctx: int, reply_tokens: int = REPLY_TOKENS) -> dict[str, Any]:
    """Each general prompt with its answer (written, else the base's greedy reply) and the base's top-k log-probs over
    that answer, saved to ``out``; the base's general-text perplexity."""
    from ftedge.bench.measures import conversation_ids

    cache = TopKCache(BASE_KIND)
    stops = backend.stop_ids
    written = 0
    for item in general.get("prompts") or []:
        if item.get("answer"):
            prompt, full = conversation_ids(backend, item["messages"], item["answer"])
        else:
            prompt = backend.chat_ids(item["messages"])
            full = prompt + backend.stream(prompt, max_new_tokens=reply_tokens, stop_ids=stops).run().ids  # the stop token included
        if len(full) > n_ctx or len(full) <= len(prompt):
            continue
        written += bool(item.get("answer"))
        logp = log_softmax(backend.logits(full)[len(prompt) - 1 : len(full) - 1], np.float32)  # row j predicts answer token j
        cache.add(full, len(prompt) - 1, *top_k(logp))
    texts = [backend.tokenize(t)[:n_ctx] for t in general.get("texts") or []]
    texts = [t for t in texts if len(t) > 1]
    nll, count = _text_nll(backend, texts)
    cache.texts = [np.asarray(t, dtype=np.int32) for t in texts]
    write_topk_cache(Path(out), cache)
    return {
        "general_prompts": len(cache),
        "written_answers": written,
        "general_texts": len(texts),
        "answer_tokens": sum(len(x) for x in cache.top_ids),
        "general_ppl": float(np.exp(nll / count)) if count else None,
    }


def _text_nll(backend: Backend, texts: Sequence[Sequence[int]]) -> tuple[float, int]:
    nll, count = 0.0, 0
    for ids in texts:
        logp = log_softmax(backend.logits(ids)[:-1], np.float32)
        nll += float(-logp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum())
        count += len(ids) - 1
    return nll, count


# -- in the worker: an artifact -------------------------------------------------------------
def drift(backend: Backend, base_file: Path) -> dict[str, Any]:
    """KL(base || artifact) and top-1 agreement over the general prompts' answers, and general-text perplexity."""
    ref = read_topk_cache(base_file, BASE_KIND)
    vocab = backend.vocab_size
    agree = kl_sum = 0.0
    positions = 0
    for seq, start, r_ids, r_logp in zip(ref.seqs, ref.starts, ref.top_ids, ref.top_logp, strict=True):
        full = seq.tolist()
        if max(full) >= vocab:
            raise FtedgeError(f"{backend.path}: its vocabulary ({vocab}) does not hold the base model's tokens")
        mine = log_softmax(backend.logits(full)[start : len(full) - 1], np.float32)
        agree += float((mine.argmax(axis=-1) == r_ids[:, 0]).sum())
        kl_sum += float(grouped_kl(r_ids, r_logp, mine).sum())
        positions += len(mine)
    nll, count = _text_nll(backend, [t.tolist() for t in ref.texts])
    return {
        "drift_kl": kl_sum / positions if positions else None,
        "drift_top1": agree / positions if positions else None,
        "drift_positions": positions,
        "general_ppl": float(np.exp(nll / count)) if count else None,
    }
