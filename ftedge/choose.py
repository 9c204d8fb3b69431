"""Which artifact ships: the ``ship: auto`` rule.

Bench writes its decision into its report and ship/ into its README; both call :func:`ship_decision`
on bench's results.json (schema 1), so the two agree and neither stage imports the other.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from ftedge.targets import MB, Target


@dataclass
class ShipCandidate:
    name: str
    format: str | None
    quant: str | None
    size_bytes: int | None
    value: float | None
    verdict: str  # "chosen", "qualifies", "rejected", "reference"
    reason: str


@dataclass
class ShipDecision:
    """What `ship: auto` picked from a bench's results, and why each artifact was or was not picked."""

    metric: str
    tolerance: float
    unit: str  # "points" (accuracy, chrF) or "%" (perplexity)
    reference: str | None
    reference_value: float | None
    chosen: str | None
    within_tolerance: bool
    summary: str
    candidates: list[ShipCandidate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric_of(doc: dict[str, Any], target: Target) -> str:
    if target.ship_metric != "auto":
        return target.ship_metric
    ref = next((e for e in doc.get("artifacts", []) if e.get("reference")), None)
    entries = [ref] if ref is not None else doc.get("artifacts", [])
    for metric in ("accuracy", "perplexity", "chrf"):
        if any(e.get(metric) is not None for e in entries):
            return metric
    return "accuracy"


def show_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.2f}" if metric == "chrf" else f"{value:.3f}"


def _tolerance(metric: str, ref: dict[str, Any] | None, target: Target) -> float:
    """Accuracy / chrF points, or percent of perplexity: the target's, else max(1, the reference's 95% half-width)."""
    if target.ship_tolerance is not None:
        return float(target.ship_tolerance)
    ci = (ref or {}).get(f"{metric}_ci")
    value = (ref or {}).get(metric)
    half = 0.0
    if isinstance(ci, list | tuple) and len(ci) == 2 and value:
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


def _misfit(entry: dict[str, Any], target: Target) -> str | None:
    size, rss = entry.get("size_bytes"), entry.get("peak_rss_mb")
    if target.max_size_mb is not None and size is not None and size / MB > target.max_size_mb:
        return f"too large for {target.name}: {size / MB:,.1f} MB > max_size_mb {target.max_size_mb:g}"
    if target.max_ram_mb is not None and rss is not None and rss > target.max_ram_mb:
        return f"needs too much memory for {target.name}: peak RSS {rss:,.0f} MB > max_ram_mb {target.max_ram_mb:g}"
    return None


def ship_decision(doc: dict[str, Any], target: Target, *, available: Collection[str] | None = None) -> ShipDecision:
    """`ship: auto` on a bench's results: the smallest GGUF within tolerance of the reference that fits and passed its gate.

    ``available``: the run's usable GGUF artifact names (on disk, gate not failed), when known.
    When no GGUF is within tolerance, the eligible one closest to the reference is chosen and the
    decision says so (``within_tolerance`` False); ``chosen`` is None when no GGUF is eligible at all.
    """
    entries = [e for e in doc.get("artifacts", []) if isinstance(e, dict)]
    metric = _metric_of(doc, target)
    higher_better = metric != "perplexity"
    ref = next((e for e in entries if e.get("reference") and e.get(metric) is not None), None)
    stand_in = ""
    if ref is None:
        measured = [e for e in entries if e.get("status") == "ok" and e.get(metric) is not None]
        if measured:
            ref = (max if higher_better else min)(measured, key=lambda e: e[metric])
            stand_in = f" (the reference has no {metric}: compared with the best artifact, {ref['name']})"
    ref_value = ref.get(metric) if ref else None
    tol = _tolerance(metric, ref, target)
    unit = "%" if metric == "perplexity" else "points"
    candidates: list[ShipCandidate] = []
    eligible: list[tuple[ShipCandidate, float | None]] = []
    for e in entries:
        value = e.get(metric)
        cand = ShipCandidate(e.get("name", "?"), e.get("format"), e.get("quant"), e.get("size_bytes"), value, "rejected", "")
        candidates.append(cand)
        if e.get("reference"):
            cand.verdict, cand.reason = "reference", "the reference the others are compared with (not an edge artifact)"
            continue
        if e.get("format") != "gguf":
            cand.reason = (
                "ONNX: ship/ holds a GGUF (llama.cpp, Ollama, LM Studio); run ONNX folders with `ftedge chat` / `ftedge serve`"
                if e.get("format") == "onnx"
                else "not a GGUF: ship/ holds a GGUF"
            )
            continue
        if e.get("status") != "ok":
            cand.reason = f"bench failed: {e.get('error', 'unknown error')}"
            continue
        if e.get("gate_passed") is False or (available is not None and cand.name not in available):
            cand.reason = "failed its parity gate at export" if e.get("gate_passed") is False else "not a usable artifact of the run"
            continue
        misfit = _misfit(e, target)
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
    ref_text = f"{ref['name']} ({show_metric(metric, ref_value)})" if ref else "none"
    within = bool(qualifying)
    if qualifying:
        chosen = min(qualifying, key=lambda c: (c.size_bytes if c.size_bytes is not None else float("inf"), c.name))
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
        chosen = min((c for c, _ in eligible), key=lambda c: (c.size_bytes if c.size_bytes is not None else float("inf"), c.name))
        summary = (
            f"ship: auto had no {metric} to compare; shipping the smallest GGUF that fits {target.name} and passed its gate, {chosen.name}"
        )
    else:
        chosen = None
        summary = f"ship: auto found no GGUF that was benched, passed its gate and fits {target.name}"
    if chosen is not None:
        chosen.verdict = "chosen"
    return ShipDecision(
        metric, tol, unit, ref.get("name") if ref else None, ref_value, chosen.name if chosen else None, within, summary, candidates
    )


def decision_markdown(decision: dict[str, Any]) -> list[str]:
    """A ShipDecision (``as_dict`` form) as markdown lines: the summary and a table of every candidate with its reason."""
    lines = [
        decision["summary"] + ".",
        "",
        "| artifact | quant | size MB | " + decision["metric"] + " | verdict | why |",
        "|---|---|---:|---:|---|---|",
    ]
    for c in decision["candidates"]:
        size = "—" if c.get("size_bytes") is None else f"{c['size_bytes'] / MB:,.1f}"
        cells = [c["name"], c.get("quant") or "—", size, show_metric(decision["metric"], c.get("value")), c["verdict"], c["reason"]]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return lines
