"""One artifact's bench, run in its own process: ``python -m ftedge.bench_worker JOB.json RESULT.json``.

The parent (``ftedge.bench``) writes a job (artifact, how to load it, held-out examples, speed
settings, the reference's parity file) and reads the result; a runtime that crashes the process
loses only its own entry. The measurement functions are importable and take any ``Backend``.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftedge import atomic, parity
from ftedge.backends.base import Backend
from ftedge.errors import FtedgeError
from ftedge.logs import quiet_third_party
from ftedge.memory import peak_rss_mb

log = logging.getLogger(__name__)

TOP_K = 64  # reference tokens kept per position for top-1 agreement and KL
EPS = 1e-12


# -- math ------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax (half the time of float64 on a 49k vocabulary; top-k and KL need no more)."""
    return parity.log_softmax(logits, np.float32)


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
    predictions: list[dict[str, str | bool]] = []
    save_ids: list[np.ndarray] = []
    save_top_ids: list[np.ndarray] = []
    save_top_logp: list[np.ndarray] = []
    offsets, row_offsets = [0], [0]
    convs = [conversation_ids(backend, ex["messages"], ex["target"]) for ex in examples]
    # Positions every conversation shares (system prompt, template header) would weigh as
    # much as N positions; top-1 / KL are scored from where the conversations first differ.
    start = parity.scored_from([full for _, full in convs])
    for i, (ex, (prompt, full)) in enumerate(zip(examples, convs, strict=True)):
        if len(full) + (max_new_tokens if task == "label_match" else 0) > n_ctx:
            skipped += 1
            offsets.append(offsets[-1])
            row_offsets.append(row_offsets[-1])
            continue
        logp = log_softmax(backend.logits(full)[:-1])  # row j predicts full[j + 1]
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
            if len(predictions) < 50:
                predictions.append({"target": str(ex["target"]), "answer": answer, "correct": ok})
        answer_rows = np.arange(len(prompt) - 1, len(full) - 1)
        nll_sum += float(-logp[answer_rows, np.asarray(full[len(prompt):])].sum())
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
    }


# -- speed -----------------------------------------------------------------------
def measure_speed(backend: Backend, messages: Sequence[dict[str, str]], *, decode_tokens: int = 64, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
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


# -- the worker ------------------------------------------------------------------
def open_backend(job: dict[str, Any]) -> Backend:
    load = dict(job.get("load") or {})
    threads = job.get("threads")
    if load.pop("kind", "auto") == "torch":
        from ftedge.backends.torch import TorchBackend

        return TorchBackend(job["path"], threads=threads, **load)
    from ftedge.backends import load_backend

    return load_backend(job["path"], threads=threads, n_ctx=int(job.get("n_ctx") or 2048), **load)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load the artifact, measure quality (if examples) and speed; return the metrics."""
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    backend = open_backend(job)
    try:
        result["load_seconds"] = round(time.perf_counter() - started, 3)
        examples = job.get("examples") or []
        if examples:
            result.update(
                measure_quality(
                    backend,
                    examples,
                    task=job.get("task", "label_match"),
                    max_new_tokens=int(job.get("max_new_tokens", 16)),
                    n_ctx=int(job.get("n_ctx") or 2048),
                    reference_in=Path(job["reference_in"]) if job.get("reference_in") else None,
                    reference_out=Path(job["reference_out"]) if job.get("reference_out") else None,
                )
            )
        speed = job["speed"]
        result.update(measure_speed(backend, speed["messages"], decode_tokens=speed["decode_tokens"], repeats=speed["repeats"], warmup=speed["warmup"]))
    finally:
        backend.close()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ftedge.bench_worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        result = run_job(job)
        code = 0
    except FtedgeError as err:
        result, code = {"status": "failed", "error": err.one_line()}, 1
    except Exception as err:  # any runtime error becomes this artifact's failed entry
        log.exception("bench of %s failed", job.get("path"))
        result, code = {"status": "failed", "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}, 1
    result["peak_rss_mb"] = peak_rss_mb()
    atomic.write_json(Path(args[1]), result)
    return code


if __name__ == "__main__":
    sys.exit(main())
