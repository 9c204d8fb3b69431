"""The parity gate: does an exported artifact still behave like the merged PyTorch model?

For N validation chat prompts (the recipe's held-out rows with their answers, chat template
applied), the artifact's next-token logits are compared position by position with the merged
model's: top-1 agreement and mean KL(reference || artifact) in nats. Positions shared by every
prompt (system prompt, template header) are scored once, not N times: scoring starts where the
prompts first differ. The gate also checks

* tokenizer consistency: the artifact's runtime tokenizes each prompt text (and the artifact
  renders each chat) exactly as Hugging Face does;
* stop: given a chat prompt, greedy decoding ends with an end-of-turn token within a bound.
  Applied when the reference itself stops within that bound (a model that never learned to
  stop is a training problem, reported but not blamed on the export).

Thresholds come from the target profile's ``gates`` (keyed by quant type), else from
``DEFAULT_GATES``. How to calibrate them: export a real run, read each artifact's figures in
the manifest (``gate.top1`` / ``gate.kl``), check the artifact's task accuracy in
``ftedge bench``, and set ``min_top1`` a few points below and ``max_kl`` about 2x above the
figures of artifacts whose accuracy is within a point of the merged model. Figures measured
on SmolLM2-135M are written down in the export issue's report and the README.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftedge.errors import FtedgeError

log = logging.getLogger(__name__)

# (min_top1, max_kl) per quant type when the target profile does not say.
DEFAULT_GATES: dict[str, tuple[float, float]] = {
    "f32": (0.99, 0.01),
    "f16": (0.99, 0.01),
    "bf16": (0.98, 0.02),
    "fp32": (0.99, 0.01),
    "fp16": (0.99, 0.01),
    "q8_0": (0.97, 0.03),
    "int8": (0.95, 0.05),
    "q6_k": (0.95, 0.06),
    "q5_k_m": (0.92, 0.10),
    "q5_k_s": (0.92, 0.10),
    "q5_0": (0.92, 0.10),
    "q5_1": (0.92, 0.10),
    "q4_k_m": (0.85, 0.25),
    "q4_k_s": (0.85, 0.25),
    "q4_0": (0.85, 0.25),
    "q4_1": (0.85, 0.25),
    "int4": (0.85, 0.25),
    "q3_k_m": (0.75, 0.50),
    "q2_k": (0.60, 1.00),
}
FALLBACK_GATE = (0.85, 0.25)
DEFAULT_STOP_BOUND = 64

FALLBACK_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "My card has not arrived yet. What should I do?",
    "Translate 'good morning' into Spanish.",
    "List three primary colors.",
    "How many days are in a leap year?",
    "Give me a short tip for sleeping better.",
    "What does a CPU do?",
)


@dataclass
class Prompt:
    """One chat prompt and, optionally, the answer the model was tuned to give."""

    messages: list[dict[str, str]]
    target: str | None = None


def thresholds_for(quant: str, target: Any | None = None) -> dict[str, float]:
    """Gate thresholds for a quant type: the target profile's, else the built-in default."""
    gates = getattr(target, "gates", None) or {}
    if quant in gates:
        g = gates[quant]
        return {"min_top1": float(g.min_top1), "max_kl": float(g.max_kl)}
    top1, kl = DEFAULT_GATES.get(quant.lower(), FALLBACK_GATE)
    return {"min_top1": top1, "max_kl": kl}


def gate_prompts(recipe: Any, n: int = 16) -> list[Prompt]:
    """Validation prompts of the recipe's data (held-out rows), or fixed chat prompts if unavailable."""
    try:
        from ftedge.data import load_splits

        val = load_splits(recipe).val
        prompts = [Prompt([dict(m) for m in ex.messages], getattr(ex, "target", None)) for ex in list(val)[:n]]
        if prompts:
            return prompts
        log.warning("no validation rows; the parity gate uses fixed chat prompts")
    except ImportError:
        log.debug("ftedge.data not available; the parity gate uses fixed chat prompts")
    except FtedgeError as err:
        log.warning("validation data unavailable (%s); the parity gate uses fixed chat prompts", err.one_line())
    system = getattr(getattr(recipe, "data", None), "system_prompt", None)
    head = [{"role": "system", "content": system}] if system else []
    return [Prompt([*head, {"role": "user", "content": text}]) for text in FALLBACK_PROMPTS[:n]]


def prompt_text(tokenizer: Any, prompt: Prompt, *, eot: str | None = None) -> str:
    """The prompt rendered with the HF chat template, followed by its answer when known."""
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    if prompt.target:
        text += prompt.target + (eot or "")
    return text


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

    @property
    def calibration_texts(self) -> list[str]:
        return list(self.texts)


def build_reference(merged_dir: Path, prompts: Sequence[Prompt], *, threads: int | None = None, stop_bound: int = DEFAULT_STOP_BOUND) -> Reference:
    """Run the merged model once over the gate prompts (reused for every artifact)."""
    from ftedge.backends.torch import TorchBackend

    if not prompts:
        raise FtedgeError("the parity gate needs at least one prompt")
    with TorchBackend(merged_dir, threads=threads) as ref:
        stops = ref.stop_ids
        eot_text = ref.tokenizer.convert_ids_to_tokens(_end_of_turn(ref))
        texts = [prompt_text(ref.tokenizer, p, eot=eot_text) for p in prompts]
        ids = [ref.tokenize(t) for t in texts]
        start = scored_from(ids)
        logprobs = [log_softmax(ref.logits(s))[start:].astype(np.float32) for s in ids]
        chat_texts = [ref.apply_chat_template(p.messages) for p in prompts]
        stop_ids = ref.tokenize(chat_texts[0])
        out = list(ref.generate(stop_ids, max_new_tokens=stop_bound, stop_ids=stops))
        stopped = bool(out) and out[-1] in stops
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


def _end_of_turn(backend: Any) -> int:
    gen = getattr(backend.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, list) and eos:
        return int(eos[0])
    if isinstance(eos, int):
        return eos
    return int(backend.tokenizer.eos_token_id)


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
    out = list(backend.generate(reference.stop_prompt_ids, max_new_tokens=reference.stop_bound, stop_ids=stops))
    stopped = bool(out) and out[-1] in stops
    applicable = bool(reference.reference_stop.get("stopped"))
    return {
        "stopped": stopped,
        "tokens": len(out),
        "bound": reference.stop_bound,
        "reference_stopped": applicable,
        "passed": stopped or not applicable,
    }


def run_gate(backend: Any, reference: Reference, quant: str, *, target: Any | None = None, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """All gate checks of one opened artifact; ``passed`` is the verdict."""
    th = thresholds or thresholds_for(quant, target)
    logits = [backend.logits(s)[reference.start :] for s in reference.ids]
    figures = compare_logits(reference.logprobs, logits)
    tok = tokenizer_check(backend, reference)
    stop = stop_check(backend, reference)
    passed = figures["top1"] >= th["min_top1"] and figures["kl"] <= th["max_kl"] and tok["passed"] and stop["passed"]
    reasons = []
    if figures["top1"] < th["min_top1"]:
        reasons.append(f"top-1 {figures['top1']:.3f} < {th['min_top1']}")
    if figures["kl"] > th["max_kl"]:
        reasons.append(f"KL {figures['kl']:.4f} > {th['max_kl']}")
    if not tok["passed"]:
        reasons.append(f"tokenizer: {tok['mismatches']} id / {tok['chat_template_mismatches']} template mismatches")
    if not stop["passed"]:
        reasons.append(f"no end-of-turn within {stop['bound']} tokens")
    return {
        "top1": round(figures["top1"], 4),
        "kl": round(figures["kl"], 5),
        "positions": figures["positions"],
        "n_prompts": len(reference.ids),
        "thresholds": th,
        "tokenizer": tok,
        "stop": stop,
        "passed": bool(passed),
        "reasons": reasons,
    }


def gate_artifact(path: Path, reference: Reference, quant: str, *, target: Any | None = None, threads: int | None = None, n_ctx: int = 2048) -> dict[str, Any]:
    """Open an artifact (.gguf or ORT GenAI folder) through its backend and gate it."""
    from ftedge.backends import load_backend

    longest = max(len(s) for s in reference.ids) + reference.stop_bound + 8
    with load_backend(path, threads=threads, n_ctx=max(n_ctx, longest)) as backend:
        return run_gate(backend, reference, quant, target=target)
