"""What bench measures on one opened artifact: quality against held-out answers and a reference, and speed.

Every function takes any ``Backend``; ``ftedge.bench.worker`` runs them in the artifact's own process.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftedge import atomic
from ftedge.backends.base import Backend
from ftedge.errors import FtedgeError
from ftedge.logits import TOP_K, grouped_kl, log_softmax, scored_from, top_k

log = logging.getLogger(__name__)


# -- math ------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# -- sequences -------------------------------------------------------------------
def conversation_ids(backend: Backend, messages: Sequence[dict[str, str]], target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + answer ids ending with the end-of-turn token), with the artifact's template."""
    prompt = backend.chat_ids(messages)
    stops = backend.stop_ids
    full_text = backend.apply_chat_template([*messages, {"role": "assistant", "content": target}], add_generation_prompt=False)
    full = backend.tokenize(full_text)
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        full = prompt + backend.tokenize(target) + sorted(stops)[:1]
    for i in range(len(prompt), len(full)):
        if full[i] in stops:
            return prompt, full[: i + 1]
    return prompt, full


def decode_answer(backend: Backend, ids: Sequence[int], max_new_tokens: int, *, given: Sequence[int] = ()) -> tuple[str, int]:
    """Greedy answer text to ``ids`` + ``given`` (answer tokens already known), and the tokens decoded."""
    stops = backend.stop_ids
    new = list(backend.generate([*ids, *given], max_new_tokens=max_new_tokens, stop_ids=stops))
    return backend.detokenize([t for t in [*given, *new] if t not in stops]), len(new)


def generate_text(backend: Backend, ids: Sequence[int], max_new_tokens: int) -> str:
    return decode_answer(backend, ids, max_new_tokens)[0]


def greedy_answer(backend: Backend, prompt: Sequence[int], full: Sequence[int], logp: np.ndarray, max_new_tokens: int) -> tuple[str, int]:
    """The greedy answer to ``prompt``, reusing the teacher-forced pass over ``full`` (prompt + gold answer).

    Greedy decoding emits the gold tokens for as long as the argmax at each answer position is
    the gold token. So an answer whose every argmax matches (end-of-turn included) needs no
    decoding at all, and one that diverges at answer token j is decoded from prompt + gold[:j].
    This is the same greedy answer up to float rounding between one batched pass and
    token-by-token decoding; it skips most decoding when the model is mostly right.
    Returns (answer text, tokens decoded).
    """
    stops = backend.stop_ids
    gold = list(full[len(prompt) :])
    pred = logp[len(prompt) - 1 : len(full) - 1].argmax(axis=-1)
    j = 0
    while j < len(gold) and int(pred[j]) == gold[j]:
        j += 1
    if j == len(gold) and gold and gold[-1] in stops and len(gold) <= max_new_tokens:
        return backend.detokenize(gold[:-1]), 0  # conversation_ids ends gold at its only stop
    if j < len(gold) and j < max_new_tokens:
        return decode_answer(backend, prompt, max_new_tokens - j, given=gold[:j])
    return decode_answer(backend, prompt, max_new_tokens)


# -- quality ---------------------------------------------------------------------
def measure_quality(
    backend: Backend,
    examples: Sequence[dict[str, Any]],
    *,
    task: str,
    max_new_tokens: int,
    n_ctx: int,
    reference_in: Path | None = None,
    reference_out: Path | None = None,
    reuse_teacher_forcing: bool = True,
) -> dict[str, Any]:
    """Accuracy (label_match), answer perplexity, and top-1 agreement / KL against a reference file.

    Returns every scored (target, answer) pair as ``predictions`` and each example's answer NLL as
    ``nll``: the bench's parent computes F1 and bootstrap intervals from them (``ftedge.bench.metrics``).

    ``reference_out`` saves this backend's top-k log-probs as the reference for other artifacts.
    ``reuse_teacher_forcing`` scores answers with ``greedy_answer`` (decodes only where the
    model leaves the gold answer); off, every answer is decoded from its prompt.
    """
    ref = None
    if reference_in is not None and Path(reference_in).is_file():
        with np.load(reference_in) as z:
            ref = {k: z[k] for k in z.files}
    correct = scored = skipped = mismatched = decoded = 0
    nll_sum = 0.0
    nll_count = 0
    agree = kl_sum = 0.0
    compared = 0
    predictions: list[dict[str, str | bool]] = []  # every scored example: metrics are computed from all of them
    nll_rows: list[tuple[float, int]] = []  # each example's answer (sum of NLL, tokens): the perplexity's bootstrap
    save_ids: list[np.ndarray] = []
    save_top_ids: list[np.ndarray] = []
    save_top_logp: list[np.ndarray] = []
    offsets, row_offsets = [0], [0]
    convs = [conversation_ids(backend, ex["messages"], ex["target"]) for ex in examples]
    # Positions every conversation shares (system prompt, template header) would weigh as
    # much as N positions; top-1 / KL are scored from where the conversations first differ.
    start = scored_from([full for _, full in convs])
    for i, (ex, (prompt, full)) in enumerate(zip(examples, convs, strict=True)):
        if len(full) + (max_new_tokens if task == "label_match" else 0) > n_ctx:
            skipped += 1
            offsets.append(offsets[-1])
            row_offsets.append(row_offsets[-1])
            continue
        logp = log_softmax(
            backend.logits(full)[:-1], np.float32
        )  # float32: half the time on a 49k vocabulary  # row j predicts full[j + 1]
        if task == "label_match":
            if reuse_teacher_forcing:
                answer, n_new = greedy_answer(backend, prompt, full, logp, max_new_tokens)
            else:
                answer, n_new = decode_answer(backend, prompt, max_new_tokens)
            answer = answer.strip()
            decoded += n_new
            ok = answer == str(ex["target"]).strip()
            correct += ok
            scored += 1
            predictions.append({"target": str(ex["target"]), "answer": answer, "correct": ok})
        answer_rows = np.arange(len(prompt) - 1, len(full) - 1)
        nll = float(-logp[answer_rows, np.asarray(full[len(prompt) :])].sum())
        nll_rows.append((nll, len(answer_rows)))
        nll_sum += nll
        nll_count += len(answer_rows)
        if reference_out is not None:
            ids_k, logp_k = top_k(logp)
            save_ids.append(np.asarray(full, dtype=np.int32))
            save_top_ids.append(ids_k)
            save_top_logp.append(logp_k)
            offsets.append(offsets[-1] + len(full))
            row_offsets.append(row_offsets[-1] + len(logp))
        if ref is not None and i + 1 < len(ref["offsets"]):
            a, b = int(ref["offsets"][i]), int(ref["offsets"][i + 1])
            if b == a:
                continue
            if ref["ids"][a:b].tolist() != list(full):
                mismatched += 1
                continue
            rows = slice(int(ref["row_offsets"][i]), int(ref["row_offsets"][i + 1]))
            r_ids, r_logp = ref["top_ids"][rows][start:], ref["top_logp"][rows][start:]
            mine = logp[start:]
            agree += float((mine.argmax(axis=-1) == r_ids[:, 0]).sum())
            kl_sum += float(grouped_kl(r_ids, r_logp, mine).sum())
            compared += len(mine)
    if reference_out is not None:
        n_rows = sum(len(x) for x in save_top_ids)
        with atomic.atomic_path(Path(reference_out)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    offsets=np.asarray(offsets, dtype=np.int64),
                    row_offsets=np.asarray(row_offsets, dtype=np.int64),
                    ids=np.concatenate(save_ids) if save_ids else np.zeros(0, np.int32),
                    top_ids=np.concatenate(save_top_ids) if save_top_ids else np.zeros((n_rows, TOP_K), np.int32),
                    top_logp=np.concatenate(save_top_logp) if save_top_logp else np.zeros((n_rows, TOP_K), np.float32),
                )
    if skipped:
        log.warning("%d held-out examples longer than the context (%d) were skipped", skipped, n_ctx)
    return {
        "n_examples": len(examples) - skipped,
        "skipped_examples": skipped,
        "accuracy": correct / scored if scored else None,
        "perplexity": float(np.exp(nll_sum / nll_count)) if nll_count else None,
        "top1_agreement": agree / compared if compared else None,
        "kl": kl_sum / compared if compared else None,
        "parity_positions": compared,
        "tokenization_mismatches": mismatched,
        "decoded_tokens": decoded,
        "predictions": predictions,
        "nll": nll_rows,
    }


# -- speed -----------------------------------------------------------------------
def measure_speed(
    backend: Backend, messages: Sequence[dict[str, str]], *, decode_tokens: int = 64, repeats: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """TTFT, prefill and decode speed of greedy generation (stop tokens ignored), after warm-up.

    decode_tok_s is the median over repeats; decode_tok_s_p95 is the speed at the 95th-percentile
    inter-token latency over all decode steps (the slow tail).
    """
    ids = backend.chat_ids(messages)
    ttfts: list[float] = []
    rates: list[float] = []
    gaps: list[float] = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in backend.generate(ids, max_new_tokens=decode_tokens, stop_ids=set())]
        if r < warmup or not stamps:
            continue
        ttfts.append(stamps[0] - t0)
        if len(stamps) > 1:
            steps = np.diff(np.asarray(stamps))
            gaps.extend(steps.tolist())
            rates.append(len(steps) / float(stamps[-1] - stamps[0]))
    if not ttfts:
        raise FtedgeError(f"{backend.path}: the model generated no tokens")
    ttft = statistics.median(ttfts)
    return {
        "prompt_tokens": len(ids),
        "ttft_ms": ttft * 1000.0,
        "prefill_tok_s": len(ids) / ttft,
        "decode_tok_s": statistics.median(rates) if rates else None,
        "decode_tok_s_p95": 1.0 / percentile(gaps, 95) if gaps else None,
        "decode_steps": len(gaps),
    }
