"""Export target profiles (``export/*.yaml``): formats, quant types, threads and budgets."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from ftedge.errors import FtedgeError
from ftedge.formats.quants import GGUF_TYPES, ONNX_PRECISIONS


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# Exactly the types the exporters build (ftedge.formats.quants); case-insensitive in YAML.
GgufType = Annotated[Literal[GGUF_TYPES], BeforeValidator(_lower)]  # type: ignore[valid-type]
OnnxPrecision = Annotated[Literal[ONNX_PRECISIONS], BeforeValidator(_lower)]  # type: ignore[valid-type]
ArtifactType = Annotated[Literal[GGUF_TYPES + ONNX_PRECISIONS], BeforeValidator(_lower)]  # type: ignore[valid-type]
ShipChoice = Annotated[Literal[GGUF_TYPES + ("auto",)], BeforeValidator(_lower)]  # type: ignore[valid-type]
ShipMetric = Literal["auto", "accuracy", "perplexity", "chrf"]
MB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateThresholds(_Strict):
    min_top1: float = Field(ge=0.0, le=1.0, description="Minimum top-1 next-token agreement with the merged PyTorch model.")
    max_kl: float = Field(ge=0.0, description="Maximum mean KL divergence (reference || artifact), in nats.")


class GgufSpec(_Strict):
    quants: list[GgufType] = Field(
        default_factory=lambda: ["q4_k_m"], description=f"GGUF types to produce; any of {', '.join(GGUF_TYPES)}."
    )


class OnnxSpec(_Strict):
    precisions: list[OnnxPrecision] = Field(
        default_factory=lambda: ["int4"],
        description=(
            f"ONNX (onnxruntime-genai, CPU) precisions to produce; any of {', '.join(ONNX_PRECISIONS)} (int4 = "
            "GPTQ, int4-rtn = the builder's round-to-nearest)."
        ),
    )


class Target(_Strict):
    name: str = Field(description="Profile name.")
    description: str = Field("", description="What device this profile stands for.")
    gguf: GgufSpec | None = Field(default_factory=GgufSpec, description="GGUF artifacts (llama.cpp); null = none.")
    onnx: OnnxSpec | None = Field(None, description="ONNX artifacts (onnxruntime-genai); null = none.")
    n_ctx: int = Field(2048, gt=0, description="Context length to load artifacts with.")
    threads: int = Field(2, gt=0, description="CPU threads to benchmark with.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest artifact file size that fits the device (MB); null = no limit.")
    max_ram_mb: float | None = Field(None, gt=0, description="Largest peak resident memory that fits the device (MB); null = no limit.")
    ship: ShipChoice | None = Field(
        None,
        description=(
            "GGUF type to put in ship/, or `auto`: the smallest GGUF whose test quality is within `ship_tolerance` of the "
            "reference, that fits max_size_mb / max_ram_mb and passed its gate (from `ftedge bench`); null = the first GGUF "
            "quant that passes its gate."
        ),
    )
    ship_metric: ShipMetric = Field(
        "auto", description="What `ship: auto` compares with the reference: `auto` = accuracy when measured, else perplexity; or chrf."
    )
    ship_tolerance: float | None = Field(
        None,
        ge=0,
        description=(
            "How much worse than the reference `ship: auto` accepts: accuracy or chrF points, or percent of perplexity; "
            "null = 1, or the reference's 95% bootstrap half-width when larger."
        ),
    )
    gates: dict[ArtifactType, GateThresholds] = Field(
        default_factory=dict,
        description="Parity thresholds per quant type (e.g. q4_k_m, int4, fp32); unset types use the built-in defaults.",
    )

    @field_validator("gates", mode="before")
    @classmethod
    def _lower_gate_keys(cls, value: Any) -> Any:
        return {_lower(k): v for k, v in value.items()} if isinstance(value, dict) else value


def profile_dirs() -> list[Path]:
    """Where target names are looked up: ./export, the source checkout's export/, the packaged copy."""
    here = Path(__file__).resolve().parent
    return [Path.cwd() / "export", here.parent / "export", here / "_data" / "export"]


def available_targets() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_target(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if candidate.is_file():
            return candidate
        raise FtedgeError(f"target profile {candidate} not found", hint="give a YAML path or one of: " + ", ".join(available_targets()))
    for d in profile_dirs():
        p = d / f"{name_or_path}.yaml"
        if p.is_file():
            return p
    raise FtedgeError(
        f"unknown target {str(name_or_path)!r}", hint="use one of: " + ", ".join(available_targets()) + " (or a path to a YAML profile)"
    )


def load_target(name_or_path: str | Path) -> Target:
    path = find_target(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        target = Target.model_validate(raw)
    except yaml.YAMLError as err:
        raise FtedgeError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "literal_error" and first["loc"][0] in ("gguf", "onnx", "ship", "gates"):
            kinds = (
                ONNX_PRECISIONS
                if first["loc"][0] == "onnx"
                else GGUF_TYPES
                if first["loc"][0] == "gguf"
                else ("auto", *GGUF_TYPES)
                if first["loc"][0] == "ship"
                else GGUF_TYPES + ONNX_PRECISIONS
            )
            raise FtedgeError(
                f"{path}: {loc}: unknown quant type {first.get('input')!r}", hint=f"ftedge builds {', '.join(kinds)}"
            ) from None
        raise FtedgeError(f"{path}: {loc}: {first['msg']}", hint="see export/laptop-cpu.yaml for a valid profile") from None
    return target


# -- ship: auto -------------------------------------------------------------------------------
# Bench writes its decision into its report and ship/ into its README; both call ship_decision on
# bench's results.json (schema 1), so the two agree and neither stage imports the other.
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
