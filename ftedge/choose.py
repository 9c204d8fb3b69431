"""Which artifact: the one home of every choice between a run's artifacts.

One function per question, called by the command that asks it; no other module ranks artifacts:

- :func:`best`: the best usable (on disk, gate not failed) artifact of a format for a target: the GGUF export's
  Modelfile names, the GGUF ship/ holds under a named ``ship:`` type, the ONNX folder of a target without GGUF.
- :func:`ship_decision`: the ``ship: auto`` rule on bench's results (bench writes it into its report, ship into its
  model card: both call this, so they agree and neither stage imports the other).
- :func:`ship_choice`: what ``ftedge ship`` puts in ship/ (one of the two above).
- :func:`default_model`: what ``ftedge chat RUN`` and ``ftedge serve RUN`` load; :func:`bundle_model`: the model of a
  ship/ bundle folder.
- :func:`fit_problem` / :func:`fits`: whether an artifact fits a target's size and memory budgets.

The orders are data: :data:`VOCABULARY` (per format, the order among types the target does not name) and
:data:`DEFAULT_FORMATS` (what chat and serve consider, best first). A new artifact kind (an adapter GGUF, say) is a
format in those tables and in ``Run.usable_models``; a device-fit prediction is another budget in :func:`fit_problem`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftedge.errors import FtedgeError, StageMissingError
from ftedge.formats.quants import GGUF_TYPES, ONNX_PRECISIONS
from ftedge.manifest import Artifact, Run
from ftedge.results import BenchResults, Entry, ShipCandidate, ShipDecision
from ftedge.targets import MB, Target

log = logging.getLogger(__name__)

# Per format, the order among the types a target does not name (float first: the most faithful).
VOCABULARY: dict[str, tuple[str, ...]] = {"gguf": GGUF_TYPES, "onnx": ONNX_PRECISIONS}
# What `ftedge chat RUN` / `ftedge serve RUN` load when the run has no ship/ bundle, best first ("hf": the merged model).
DEFAULT_FORMATS: tuple[str, ...] = ("gguf", "onnx", "hf")
# What ship/ can hold, per target: a GGUF (llama.cpp, Ollama, LM Studio), or for a target without GGUF an ONNX folder.
SHIP_FORMATS: tuple[str, ...] = ("gguf", "onnx")


# -- the best artifact of a format ----------------------------------------------------------------
def target_order(target: Target | None, fmt: str) -> list[str]:
    """The types a target asks for, in its order: its named ``ship`` type first, then its ``gguf.quants`` / ``onnx.precisions``."""
    if target is None:
        return []
    if fmt == "gguf":
        named = [target.ship] if target.ship and target.ship != "auto" else []
        return named + list(target.gguf.quants if target.gguf else [])
    if fmt == "onnx":
        return list(target.onnx.precisions if target.onnx else [])
    return []


def ranked(artifacts: Iterable[Artifact], fmt: str, target: Target | None = None) -> list[Artifact]:
    """``artifacts`` best first: the target's types in its order, then the rest in :data:`VOCABULARY` order, then by key."""
    named = target_order(target, fmt)
    vocab = VOCABULARY.get(fmt, ())

    def rank(a: Artifact) -> tuple[int, int, str]:
        q = a.quant or ""
        if q in named:
            return 0, named.index(q), a.key
        return 1, vocab.index(q) if q in vocab else len(vocab), a.key

    return sorted(artifacts, key=rank)


def best(run: Run, fmt: str, target: Target | None = None) -> Artifact | None:
    """The best usable artifact of ``fmt`` (on disk, its gate not failed) for ``target``; None when there is none."""
    return next(iter(ranked(run.usable_models(fmt), fmt, target)), None)


# -- chat and serve ---------------------------------------------------------------------------------
def bundle_model(folder: Path) -> Path | None:
    """The model of a ship/ bundle (or any folder holding one model): its one .gguf, else its one ORT GenAI folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    kinds = {
        "GGUF files": sorted(folder.glob("*.gguf")),
        "ORT GenAI folders": sorted(p for p in folder.iterdir() if (p / "genai_config.json").is_file()),
    }
    for kind, models in kinds.items():
        if len(models) > 1:
            names = ", ".join(p.name for p in models)
            raise FtedgeError(f"{folder} holds several {kind} ({names})", hint="name the one to use")
        if models:
            return models[0]
    return None


def default_model(run: Run, target: Target | None = None) -> Path:
    """What `ftedge chat RUN` / `ftedge serve RUN` load: the shipped model, else the best usable artifact of
    :data:`DEFAULT_FORMATS` (GGUF, ONNX, the merged model) for ``target`` (the run's export target, when known)."""
    shipped = bundle_model(run.path / "ship")
    if shipped is not None:
        return shipped
    for fmt in DEFAULT_FORMATS:
        chosen = best(run, fmt, target)
        if chosen is not None:
            return chosen.path
    raise FtedgeError(
        f"{run.path} has no shipped, passing GGUF or ONNX, or merged model to load",
        hint=f"run `ftedge merge {run.path}` and `ftedge export {run.path}` first",
    )


# -- ship -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShipChoice:
    artifact: Artifact
    rule: str  # "auto", the target's named type, or "first passing"
    decision: ShipDecision | None = None  # with ship: auto


def ship_choice(run: Run, target: Target, results: BenchResults | None) -> ShipChoice:
    """What ship/ holds: with ``ship: auto`` the :func:`ship_decision` on ``results``; else the best passing GGUF
    (the named type first); for a target without GGUF, the best passing ONNX folder."""
    if not (target.gguf and target.gguf.quants):
        chosen = best(run, "onnx", target)
        if chosen is None:
            raise FtedgeError(
                f"no ONNX artifact in {run.path} passed its parity gate (target {target.name} has no GGUF)",
                hint=f"see `ftedge export {run.path}` output; loosen the target's gates only if the figures are acceptable",
            )
        return ShipChoice(chosen, "first passing")
    if target.ship != "auto":
        chosen = best(run, "gguf", target)
        if chosen is None:
            raise FtedgeError(
                f"no GGUF artifact in {run.path} passed its parity gate",
                hint=f"see `ftedge export {run.path}` output; loosen the target's gates only if the figures are acceptable",
            )
        return ShipChoice(chosen, target.ship or "first passing")
    if results is None or not run.is_done("bench"):
        raise StageMissingError(
            f"ship: auto picks from the bench results, and {run.path} has none",
            hint=f"run `ftedge bench {run.path}` first, or name the quant to ship in the target (ship: q4_k_m)",
        )
    usable = {a.key: a for a in run.usable_models("gguf")}
    decision = ship_decision(results, target, available=set(usable))
    log.info("%s", decision.summary)
    for c in decision.candidates:
        if c.verdict != "reference":
            log.info("  %s: %s: %s", c.name, c.verdict, c.reason)
    if decision.chosen is None:
        raise FtedgeError(
            decision.summary, hint="see bench/report.md; export a smaller quant, raise the target's budgets, or set ship: TYPE by hand"
        )
    return ShipChoice(usable[decision.chosen], "auto", decision)


# -- fit ------------------------------------------------------------------------------------------
def fit_problem(size_bytes: int | None, peak_rss_mb: float | None, target: Target) -> str | None:
    """Why an artifact does not fit ``target`` (file size over max_size_mb, peak RSS over max_ram_mb); None when it fits or is unknown."""
    if target.max_size_mb is not None and size_bytes is not None and size_bytes / MB > target.max_size_mb:
        return f"too large for {target.name}: {size_bytes / MB:,.1f} MB > max_size_mb {target.max_size_mb:g}"
    if target.max_ram_mb is not None and peak_rss_mb is not None and peak_rss_mb > target.max_ram_mb:
        return f"needs too much memory for {target.name}: peak RSS {peak_rss_mb:,.0f} MB > max_ram_mb {target.max_ram_mb:g}"
    return None


def fits(size_bytes: int | None, peak_rss_mb: float | None, target: Target) -> bool | None:
    """Whether an artifact fits the target's size and memory budgets (None when neither is known or set)."""
    if fit_problem(size_bytes, peak_rss_mb, target) is not None:
        return False
    known = (target.max_size_mb is not None and size_bytes is not None) or (target.max_ram_mb is not None and peak_rss_mb is not None)
    return True if known else None


# -- ship: auto -------------------------------------------------------------------------------------
def _metric_of(results: BenchResults, target: Target) -> str:
    if target.ship_metric != "auto":
        return target.ship_metric
    ref = results.reference_entry
    entries = [ref] if ref is not None else results.artifacts
    for metric in ("accuracy", "perplexity", "chrf"):
        if any(e.value(metric) is not None for e in entries):
            return metric
    return "accuracy"


def show_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.2f}" if metric == "chrf" else f"{value:.3f}"


def _tolerance(metric: str, ref: Entry | None, target: Target) -> float:
    """Accuracy / chrF points, or percent of perplexity: the target's, else max(1, the reference's 95% half-width)."""
    if target.ship_tolerance is not None:
        return float(target.ship_tolerance)
    ci = ref.value(f"{metric}_ci") if ref is not None else None
    value = ref.value(metric) if ref is not None else None
    half = 0.0
    if isinstance(ci, Sequence) and len(ci) == 2 and value:
        width = (float(ci[1]) - float(ci[0])) / 2
        half = 100 * width if metric == "accuracy" else width if metric == "chrf" else 100 * width / float(value)
    return round(max(1.0, half), 2)


def _gap(metric: str, value: float, ref_value: float) -> float:
    """How much worse than the reference, in the tolerance's unit (negative: better)."""
    if metric == "accuracy":
        return 100 * (ref_value - value)
    if metric == "chrf":
        return ref_value - value
    return 100 * (value / ref_value - 1)


def _amount(x: float, unit: str) -> str:
    if unit == "%":
        return f"{x:.2f}%"
    return f"{x:.2f} point" + ("" if round(x, 2) == 1 else "s")


def _by_size(c: ShipCandidate) -> tuple[float, str]:
    return (c.size_bytes if c.size_bytes is not None else float("inf"), c.name)


def ship_decision(results: BenchResults, target: Target, *, available: Collection[str] | None = None) -> ShipDecision:
    """`ship: auto` on a bench's results: the smallest GGUF within tolerance of the reference that fits and passed its gate.

    ``available``: the run's usable GGUF artifact names (on disk, gate not failed), when known.
    When no GGUF is within tolerance, the eligible one closest to the reference is chosen and the
    decision says so (``within_tolerance`` False); ``chosen`` is None when no GGUF is eligible at all.
    """
    entries = results.artifacts
    metric = _metric_of(results, target)
    higher_better = metric != "perplexity"
    ref = next((e for e in entries if e.reference and e.value(metric) is not None), None)
    stand_in = ""
    if ref is None:
        measured = [e for e in entries if e.ok and e.value(metric) is not None]
        if measured:
            ref = (max if higher_better else min)(measured, key=lambda e: e.value(metric))
            stand_in = f" (the reference has no {metric}: compared with the best artifact, {ref.name})"
    ref_value = ref.value(metric) if ref else None
    tol = _tolerance(metric, ref, target)
    unit = "%" if metric == "perplexity" else "points"
    candidates: list[ShipCandidate] = []
    eligible: list[tuple[ShipCandidate, float | None]] = []
    for e in entries:
        value = e.value(metric)
        cand = ShipCandidate(
            name=e.name, format=e.format, quant=e.quant, size_bytes=e.size_bytes, value=value, verdict="rejected", reason=""
        )
        candidates.append(cand)
        if e.reference:
            cand.verdict, cand.reason = "reference", "the reference the others are compared with (not an edge artifact)"
            continue
        if e.format != "gguf":
            cand.reason = (
                "ONNX: ship/ holds a GGUF (llama.cpp, Ollama, LM Studio); run ONNX folders with `ftedge chat` / `ftedge serve`"
                if e.format == "onnx"
                else "not a GGUF: ship/ holds a GGUF"
            )
            continue
        if not e.ok:
            cand.reason = f"bench failed: {e.error or 'unknown error'}"
            continue
        if e.gate_passed is False or (available is not None and cand.name not in available):
            cand.reason = "failed its parity gate at export" if e.gate_passed is False else "not a usable artifact of the run"
            continue
        misfit = fit_problem(e.size_bytes, e.peak_rss_mb, target)
        if misfit:
            cand.reason = misfit
            continue
        gap = _gap(metric, value, ref_value) if value is not None and ref_value is not None else None
        eligible.append((cand, gap))
        if value is None:
            cand.reason = f"no {metric} measured"
        elif gap is not None and gap > tol + 1e-9:  # 0.80 - 0.79 is 1.0000000000000009 points
            cand.reason = (
                f"{metric} {show_metric(metric, value)}: {_amount(gap, unit)} worse than the reference (tolerance {_amount(tol, unit)})"
            )
        else:
            cand.verdict = "qualifies"
            cand.reason = f"{metric} {show_metric(metric, value)} within {_amount(tol, unit)} of the reference, fits, passed its gate"
    qualifying = [c for c, _ in eligible if c.verdict == "qualifies"]
    ref_text = f"{ref.name} ({show_metric(metric, ref_value)})" if ref else "none"
    chosen: ShipCandidate | None
    if qualifying:
        chosen = min(qualifying, key=_by_size)
        summary = (
            f"ship: auto chose {chosen.name}: the smallest GGUF whose {metric} is within {_amount(tol, unit)} of the reference "
            f"{ref_text}{stand_in}, that fits {target.name} and passed its gate"
        )
        for c in qualifying:
            if c is not chosen:
                c.reason += f"; larger than {chosen.name}"
    elif any(g is not None for _, g in eligible):
        chosen = min((c for c, g in eligible if g is not None), key=lambda c: (_gap(metric, c.value, ref_value), c.size_bytes or 0))
        summary = (
            f"ship: auto found no GGUF within {_amount(tol, unit)} of the reference {ref_text}{stand_in}; shipping the closest that "
            f"fits {target.name} and passed its gate, {chosen.name}: check its figures, or widen ship_tolerance"
        )
    elif eligible:
        chosen = min((c for c, _ in eligible), key=_by_size)
        summary = (
            f"ship: auto had no {metric} to compare; shipping the smallest GGUF that fits {target.name} and passed its gate, {chosen.name}"
        )
    else:
        chosen = None
        summary = f"ship: auto found no GGUF that was benched, passed its gate and fits {target.name}"
    if chosen is not None:
        chosen.verdict = "chosen"
    return ShipDecision(
        metric=metric,
        tolerance=tol,
        unit=unit,
        reference=ref.name if ref else None,
        reference_value=ref_value,
        chosen=chosen.name if chosen else None,
        within_tolerance=bool(qualifying),
        summary=summary,
        candidates=candidates,
    )


def decision_markdown(decision: ShipDecision) -> list[str]:
    """A ShipDecision as markdown lines: the summary and a table of every candidate with its reason."""
    lines = [
        decision.summary + ".",
        "",
        "| artifact | quant | size MB | " + decision.metric + " | verdict | why |",
        "|---|---|---:|---:|---|---|",
    ]
    for c in decision.candidates:
        size = "—" if c.size_bytes is None else f"{c.size_bytes / MB:,.1f}"
        cells = [c.name, c.quant or "—", size, show_metric(decision.metric, c.value), c.verdict, c.reason]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return lines
