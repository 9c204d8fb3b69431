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

from ftedge.backends.base import Backend, token_windows
from ftedge.errors import FtedgeError
from ftedge.formats.logits_cache import TopKCache, read_topk_cache, write_topk_cache
from ftedge.logits import TOP_K, grouped_kl, log_softmax, scored_from, top_k

log = logging.getLogger(__name__)

# The gold answer is taken from the teacher-forced pass only where each gold token leads the runner-up by this many
# nats. One batched pass and token-by-token decoding of the same GGUF move a top-1 margin by up to 0.02 nat (f16) and
# 0.27-0.46 nat (q8_0, q4_k_m, q4_0; repacking on or off) on SmolLM2-135M answer positions (measured for issue 17,
# 8 BANKING77 rows, p99 0.35-0.40): 2 nats is 4x the largest move, so an accepted answer is the decoded answer.
SAFE_MARGIN = 2.0
ANSWER_SLACK = 8  # tokens beyond the longest gold answer: room for an answer tokenized differently
REFERENCE_KIND = "quality-reference"  # the top-k cache the reference artifact writes (ftedge.formats.logits_cache)


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
    """Greedy answer text to ``ids`` + ``given`` (answer tokens already known), and the tokens decoded (a stop token too)."""
    stops = backend.stop_ids
    reply = backend.stream([*ids, *given], max_new_tokens=max_new_tokens, stop_ids=stops)
    new = list(reply)
    return backend.detokenize([t for t in [*given, *new] if t not in stops]), len(reply.ids)


def generate_text(backend: Backend, ids: Sequence[int], max_new_tokens: int) -> str:
    return decode_answer(backend, ids, max_new_tokens)[0]


def greedy_answer(
    backend: Backend, prompt: Sequence[int], full: Sequence[int], logp: np.ndarray, max_new_tokens: int, *, margin: float = SAFE_MARGIN
) -> tuple[str, int]:
    """The greedy answer to ``prompt``, taking the gold answer from the teacher-forced pass over ``full`` only where it is safe.

    Greedy decoding emits the gold answer (end-of-turn included) when each gold token is the argmax at its position.
    One batched pass over ``full`` and token-by-token decoding give slightly different logits (other kernels, other
    accumulation order), so the gold answer is accepted only where every gold token leads the runner-up by at least
    ``margin`` nats, far beyond that difference; anywhere else the answer is decoded from the prompt alone, token by
    token, as any runtime does. The result is the decoded answer row for row; most rows of a good model skip decoding.
    Returns (answer text, tokens decoded).
    """
    stops = backend.stop_ids
    gold = list(full[len(prompt) :])
    if gold and gold[-1] in stops and len(gold) <= max_new_tokens:
        rows = np.array(logp[len(prompt) - 1 : len(full) - 1], dtype=np.float32)
        at = np.arange(len(gold))
        lead = rows[at, gold].copy()
        rows[at, gold] = -np.inf
        if bool(np.all(lead - rows.max(axis=-1) >= margin)):
            return backend.detokenize(gold[:-1]), 0  # conversation_ids ends gold at its only stop
    return decode_answer(backend, prompt, max_new_tokens)


def answer_budget(convs: Sequence[tuple[Sequence[int], Sequence[int]]], cap: int | None = None) -> int:
    """Tokens to generate per answer: the longest gold answer (end-of-turn included) + ``ANSWER_SLACK``, at most ``cap``."""
    longest = max((len(full) - len(prompt) for prompt, full in convs), default=0)
    budget = longest + ANSWER_SLACK
    if cap is not None and cap < budget:
        if cap < longest:
            log.warning(
                "max_new_tokens=%d is shorter than the longest answer (%d tokens): some rows cannot be answered right", cap, longest
            )
        return cap
    return budget


# -- quality ---------------------------------------------------------------------
def measure_quality(
    backend: Backend,
    examples: Sequence[dict[str, Any]],
    *,
    task: str,
    n_ctx: int,
    max_new_tokens: int | None = None,
    reference_in: Path | None = None,
    reference_out: Path | None = None,
    reuse_teacher_forcing: bool = True,
) -> dict[str, Any]:
    """Accuracy (label_match), answer perplexity, and top-1 agreement / KL against a reference file.

    Returns every scored (target, answer) pair as ``predictions`` and each example's answer NLL as
    ``nll``: the bench's parent computes F1 and bootstrap intervals from them (``ftedge.bench.metrics``).
    The generation budget is ``answer_budget`` (the longest gold answer + slack), capped by ``max_new_tokens``.
    ``reference_out`` saves this backend's top-k log-probs as the reference for other artifacts.
    ``reuse_teacher_forcing`` scores answers with ``greedy_answer`` (skips decoding where the gold answer leads by a
    safe margin); off, every answer is decoded from its prompt. ``predictions`` holds every scored row, in order.
    """
    ref = read_topk_cache(reference_in, REFERENCE_KIND) if reference_in is not None and Path(reference_in).is_file() else None
    save = TopKCache(REFERENCE_KIND) if reference_out is not None else None  # one entry per example, empty when skipped
    correct = scored = skipped = mismatched = decoded = 0
    nll_sum = 0.0
    nll_count = 0
    agree = kl_sum = 0.0
    compared = 0
    predictions: list[dict[str, Any]] = []  # every scored example: metrics are computed from all of them
    nll_rows: list[tuple[float, int]] = []  # each example's answer (sum of NLL, tokens): the perplexity's bootstrap
    convs = [conversation_ids(backend, ex["messages"], ex["target"]) for ex in examples]
    budget = answer_budget(convs, max_new_tokens) if task == "label_match" else 0
    # Positions every conversation shares (system prompt, template header) would weigh as
    # much as N positions; top-1 / KL are scored from where the conversations first differ.
    start = scored_from([full for _, full in convs])
    fits = [max(len(full), len(prompt) + budget) <= n_ctx for prompt, full in convs]
    # The teacher-forced passes run a window of rows at a time (Backend.logits_batch: padded batches on torch), so
    # the logits held stay bounded; the rows of a window are then scored one by one, in order.
    window_logits: dict[int, np.ndarray] = {}
    windows = iter(token_windows([len(full) if ok else 0 for (_, full), ok in zip(convs, fits, strict=True)]))
    for i, (ex, (prompt, full)) in enumerate(zip(examples, convs, strict=True)):
        if not fits[i]:
            skipped += 1
            if save is not None:
                save.add([], 0, np.zeros((0, TOP_K), np.int32), np.zeros((0, TOP_K), np.float32))
            continue
        while i not in window_logits:
            rows = [j for j in next(windows) if fits[j]]
            window_logits = dict(zip(rows, backend.logits_batch([convs[j][1] for j in rows]), strict=True))
        logp = log_softmax(window_logits.pop(i)[:-1], np.float32)  # float32: half the time on a 49k vocabulary; row j predicts full[j + 1]
        if task == "label_match":
            if reuse_teacher_forcing:
                answer, n_new = greedy_answer(backend, prompt, full, logp, budget)
            else:
                answer, n_new = decode_answer(backend, prompt, budget)
            answer = answer.strip()
            decoded += n_new
            ok = answer == str(ex["target"]).strip()
            correct += ok
            scored += 1
            predictions.append({"row": i, "target": str(ex["target"]), "answer": answer, "correct": ok, "decoded": n_new > 0})
        answer_rows = np.arange(len(prompt) - 1, len(full) - 1)
        nll = float(-logp[answer_rows, np.asarray(full[len(prompt) :])].sum())
        nll_rows.append((nll, len(answer_rows)))
        nll_sum += nll
        nll_count += len(answer_rows)
        if save is not None:
            save.add(full, 0, *top_k(logp))
        if ref is not None and i < len(ref):
            if not len(ref.seqs[i]):
                continue
            if ref.seqs[i].tolist() != list(full):
                mismatched += 1
                continue
            r_ids, r_logp = ref.top_ids[i][start:], ref.top_logp[i][start:]
            mine = logp[start:]
            agree += float((mine.argmax(axis=-1) == r_ids[:, 0]).sum())
            kl_sum += float(grouped_kl(r_ids, r_logp, mine).sum())
            compared += len(mine)
    if save is not None:
        write_topk_cache(Path(reference_out), save)
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
        "max_new_tokens": budget or None,
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
        stamps = [time.perf_counter() for _ in backend.stream(ids, max_new_tokens=decode_tokens, stop_ids=set())]
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
