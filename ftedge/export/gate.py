"""The parity gate: does an exported artifact still behave like the merged PyTorch model?

For N validation chat prompts (the recipe's validation rows with their answers, chat template
applied), the artifact's next-token distributions are compared position by position with the
merged model's. The verdict rests on faithfulness, not on ties:

* KL(reference || artifact) in nats: its mean and its 99th percentile over the positions (the tail
  catches damage confined to a few positions, e.g. one broken token);
* top-1 agreement on the positions where the reference is confident (its top token leads the
  runner-up by ``CONFIDENT_MARGIN`` nats): a flip there changes an answer. Raw top-1 over every
  position is reported too, but not judged: where the reference's top tokens are near-tied, a
  faithful artifact resolves the tie either way (a barely-trained adapter is near-tied almost
  everywhere). Positions shared by every prompt (system prompt, template header) are scored once,
  not N times: scoring starts where the prompts first differ.

The gate also checks

* tokenizer consistency: the artifact's runtime tokenizes each prompt text (and the artifact
  renders each chat) exactly as Hugging Face does;
* stop: given a chat prompt, greedy decoding ends with an end-of-turn token within a bound.
  Applied when the reference itself stops within that bound (a model that never learned to
  stop is a training problem, reported but not blamed on the export).

Thresholds come from the target profile's ``gates`` (keyed by quant type; unset keys fall back),
else from ``ftedge.formats.quants.DEFAULT_GATES``, which says where its figures come from (llama.cpp's
KL-divergence tool, scaled for small models). GGUFs are loaded with the target's llama.cpp runtime
settings (``target.runtime``), the ones the bench and the device use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftedge.data.prompts import Prompt
from ftedge.errors import FtedgeError
from ftedge.families import end_of_turn_id
from ftedge.formats.quants import CONFIDENT_MARGIN, DEFAULT_GATES, MIN_CONFIDENT_POSITIONS
from ftedge.logits import compare_logits, log_softmax, scored_from
from ftedge.targets import Target

log = logging.getLogger(__name__)

DEFAULT_STOP_BOUND = 64


def thresholds_for(quant: str, target: Target | None = None) -> dict[str, float]:
    """Gate thresholds for a quant type: the target profile's keys where set, else the built-in defaults."""
    default = DEFAULT_GATES[quant.lower()]
    th = {"max_kl": default.max_kl, "max_kl_p99": default.max_kl_p99, "min_top1_confident": default.min_top1_confident}
    gates = target.gates if target is not None else {}
    if quant.lower() in gates:
        th.update({k: float(v) for k, v in gates[quant.lower()].model_dump().items() if v is not None})
    return th


@dataclass
class Reference:
    """The merged PyTorch model's view of the gate prompts: ids, log-probs, stop behaviour."""

    prompts: list[Prompt]
    texts: list[str]
    ids: list[list[int]]
    start: int  # first scored position (shared prefix skipped)
    logprobs: list[np.ndarray]
    chat_texts: list[str]  # prompt rendered with add_generation_prompt (for the template check)
    stop_prompt_ids: list[int]
    stop_bound: int
    reference_stop: dict[str, Any] = field(default_factory=dict)


def build_reference(
    merged_dir: Path, prompts: Sequence[Prompt], *, threads: int | None = None, stop_bound: int = DEFAULT_STOP_BOUND
) -> Reference:
    """Run the merged model once over the gate prompts (reused for every artifact)."""
    from ftedge.backends.torch import TorchBackend

    if not prompts:
        raise FtedgeError("the parity gate needs at least one prompt")
    with TorchBackend(merged_dir, threads=threads) as ref:
        stops = ref.stop_ids
        eot_text = ref.tokenizer.convert_ids_to_tokens(end_of_turn_id(ref.tokenizer))
        texts = [p.text(ref.tokenizer, eot=eot_text) for p in prompts]
        ids = [ref.tokenize(t) for t in texts]
        start = scored_from(ids)
        logprobs = [log_softmax(lg).astype(np.float32) for lg in ref.logits_batch(ids, start=start)]
        chat_texts = [ref.apply_chat_template(p.messages) for p in prompts]
        stop_ids = ref.tokenize(chat_texts[0])
        reply = ref.stream(stop_ids, max_new_tokens=stop_bound, stop_ids=stops).run()
        out, stopped = reply.ids, reply.finish == "stop"
    return Reference(
        prompts=list(prompts),
        texts=texts,
        ids=ids,
        start=start,
        logprobs=logprobs,
        chat_texts=chat_texts,
        stop_prompt_ids=stop_ids,
        stop_bound=stop_bound,
        reference_stop={"stopped": stopped, "tokens": len(out)},
    )


def tokenizer_check(backend: Any, reference: Reference) -> dict[str, Any]:
    """Same text -> same ids (HF vs the artifact's runtime); same chat -> same rendered text."""
    mismatches: list[dict[str, Any]] = []
    for i, (text, ids) in enumerate(zip(reference.texts, reference.ids, strict=True)):
        got = list(backend.tokenize(text))
        if got != ids:
            at = next((j for j, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), min(len(got), len(ids)))
            mismatches.append({"prompt": i, "position": at, "hf": ids[at : at + 3], "artifact": got[at : at + 3]})
    template_mismatch = []
    for i, (prompt, text) in enumerate(zip(reference.prompts, reference.chat_texts, strict=True)):
        try:
            rendered = backend.apply_chat_template(prompt.messages)
        except FtedgeError as err:
            rendered = f"<error: {err.one_line()}>"
        if rendered != text:
            template_mismatch.append(i)
    return {
        "samples": len(reference.texts),
        "mismatches": len(mismatches),
        "examples": mismatches[:3],
        "chat_template_mismatches": len(template_mismatch),
        "passed": not mismatches and not template_mismatch,
    }


def stop_check(backend: Any, reference: Reference) -> dict[str, Any]:
    """Greedy decoding of the first chat prompt must end with an end-of-turn id within the bound."""
    stops = backend.stop_ids
    reply = backend.stream(reference.stop_prompt_ids, max_new_tokens=reference.stop_bound, stop_ids=stops).run()
    out, stopped = reply.ids, reply.finish == "stop"
    applicable = bool(reference.reference_stop.get("stopped"))
    return {
        "stopped": stopped,
        "tokens": len(out),
        "bound": reference.stop_bound,
        "reference_stopped": applicable,
        "passed": stopped or not applicable,
    }


def judge(figures: dict[str, Any], th: dict[str, float]) -> list[str]:
    """Why logit figures miss thresholds (empty: they pass). The top-1 check needs enough confident positions."""
    reasons = []
    if not figures["kl"] <= th["max_kl"]:
        reasons.append(f"mean KL {figures['kl']:.4f} > {th['max_kl']}")
    if not figures["kl_p99"] <= th["max_kl_p99"]:
        reasons.append(f"p99 KL {figures['kl_p99']:.4f} > {th['max_kl_p99']}")
    if figures["confident_positions"] >= MIN_CONFIDENT_POSITIONS and not figures["top1_confident"] >= th["min_top1_confident"]:
        n = figures["confident_positions"]
        reasons.append(f"top-1 {figures['top1_confident']:.3f} < {th['min_top1_confident']} on the {n} confident positions")
    return reasons


def run_gate(
    backend: Any, reference: Reference, quant: str, *, target: Target | None = None, thresholds: dict[str, float] | None = None
) -> dict[str, Any]:
    """All gate checks of one opened artifact; ``passed`` is the verdict."""
    th = thresholds or thresholds_for(quant, target)
    logits = [backend.logits(s)[reference.start :] for s in reference.ids]
    figures = compare_logits(reference.logprobs, logits)
    tok = tokenizer_check(backend, reference)
    stop = stop_check(backend, reference)
    reasons = judge(figures, th)
    if not tok["passed"]:
        reasons.append(f"tokenizer: {tok['mismatches']} id / {tok['chat_template_mismatches']} template mismatches")
    if not stop["passed"]:
        reasons.append(f"no end-of-turn within {stop['bound']} tokens")
    confident = figures["confident_positions"]
    return {
        "kl": round(figures["kl"], 5),
        "kl_p99": round(figures["kl_p99"], 5),
        "kl_max": round(figures["kl_max"], 5),
        "top1_confident": round(figures["top1_confident"], 4) if confident else None,
        "confident_positions": confident,
        "confident_margin": CONFIDENT_MARGIN,
        "top1_checked": confident >= MIN_CONFIDENT_POSITIONS,
        "top1": round(figures["top1"], 4),  # raw, over every position: reported, not judged
        "positions": figures["positions"],
        "n_prompts": len(reference.ids),
        "thresholds": th,
        "tokenizer": tok,
        "stop": stop,
        "runtime": getattr(backend, "settings", {}),
        "passed": not reasons,
        "reasons": reasons,
    }


def gate_artifact(
    path: Path, reference: Reference, quant: str, *, target: Target | None = None, threads: int | None = None, n_ctx: int = 2048
) -> dict[str, Any]:
    """Open an artifact (.gguf or ORT GenAI folder) through its backend, with the target's runtime settings, and gate it."""
    from ftedge.backends import load_backend, runtime_options

    longest = max(len(s) for s in reference.ids) + reference.stop_bound + 8
    options = runtime_options(path, target.runtime if target is not None else None)
    with load_backend(path, threads=threads, n_ctx=max(n_ctx, longest), **options) as backend:
        return run_gate(backend, reference, quant, target=target)
