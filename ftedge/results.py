"""The bench's results (``bench/results.json``): one typed, versioned schema that bench writes and report, choose and ship read.

Bench builds a :class:`BenchResults` (one :class:`Entry` per artifact) and writes it with
:func:`write_results`; every reader goes through :func:`load_results` (a file) or :func:`parse_results`
(a decoded document), which refuse an unknown key or a newer schema in one line naming where. Neither
side parses the JSON itself, so a key exists exactly when it is a field here.

``schema`` stays 1 while keys only get added (old files lack them: they read as None); a key that
changes meaning bumps :data:`SCHEMA`, and :data:`UPGRADES` then turns the older documents into the new shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftedge import atomic
from ftedge.errors import FtedgeError, from_os_error

SCHEMA = 1
# Older schema numbers this reader still takes, and how each becomes the current shape (none yet: schema 1 is the first).
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Entry(_Strict):
    """One benched artifact. A new measurement is a new optional field here (None where not measured)."""

    name: str
    format: str
    quant: str | None = None
    path: str
    size_bytes: int | None = None
    status: Literal["ok", "failed"]
    reference: bool = False
    gate_passed: bool | None = Field(None, description="The export's parity-gate verdict, when the artifact was gated.")
    error: str | None = None
    # quality (bench.measures, bench.metrics, bench.generative)
    accuracy: float | None = None
    accuracy_ci: list[float] | None = None
    macro_f1: float | None = None
    perplexity: float | None = None
    perplexity_ci: list[float] | None = None
    chrf: float | None = None
    chrf_ci: list[float] | None = None
    top1_agreement: float | None = None
    kl: float | None = None
    # drift from base (bench.forgetting)
    drift_kl: float | None = None
    drift_top1: float | None = None
    general_ppl: float | None = None
    drift_positions: int | None = None
    # speed and memory
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_tok_s_p95: float | None = None
    peak_rss_mb: float | None = None
    fits: bool | None = Field(None, description="Size and peak RSS within the target's budgets (ftedge.choose.fit_problem).")
    # detail
    n_examples: int | None = None
    skipped_examples: int | None = None
    per_label: dict[str, dict[str, Any]] | None = None
    confusions: list[dict[str, Any]] | None = None
    generations: list[dict[str, Any]] | None = None
    parity_positions: int | None = None
    tokenization_mismatches: int | None = None
    prompt_tokens: int | None = None
    decode_steps: int | None = None
    decoded_tokens: int | None = None
    max_new_tokens: int | None = None
    runtime: dict[str, Any] | None = None
    load_seconds: float | None = None
    phase_seconds: dict[str, float] | None = None
    wall_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, metric: str) -> Any:
        """A field by name (``accuracy``, ``perplexity_ci``, ...): for code that picks the metric at run time."""
        if metric not in type(self).model_fields:
            raise KeyError(metric)
        return getattr(self, metric)


# Filled from the bench worker's result; the rest of an Entry comes from the artifact itself.
ARTIFACT_KEYS = ("name", "format", "quant", "path", "size_bytes", "status", "reference", "gate_passed", "error")
MEASURED_KEYS = tuple(k for k in Entry.model_fields if k not in ARTIFACT_KEYS)


class TargetInfo(_Strict):
    name: str
    threads: int
    n_ctx: int
    max_size_mb: float | None = None
    max_ram_mb: float | None = None
    runtime: dict[str, Any] | None = None

    @classmethod
    def of(cls, target: Any) -> TargetInfo:
        """The part of a :class:`ftedge.targets.Target` results.json keeps."""
        return cls(
            name=target.name,
            threads=target.threads,
            n_ctx=target.n_ctx,
            max_size_mb=target.max_size_mb,
            max_ram_mb=target.max_ram_mb,
            runtime=target.runtime.model_dump(),
        )


class EvalInfo(_Strict):
    task: str | None = None
    n_examples: int = 0
    max_new_tokens: int | None = Field(None, description="The answer budget used (longest answer + slack, capped).")
    max_new_tokens_cap: int | None = None
    split: Literal["test", "file"] | None = Field(None, description="`test`: a run's test split; `file`: bench --data.")
    n_available: int | None = None
    data: str | None = Field(None, description="bench --data: the file scored.")


class SpeedInfo(_Strict):
    prompt_tokens: int | None = None
    decode_tokens: int
    repeats: int
    warmup: int
    greedy: bool = True


class HostInfo(_Strict):
    cpu: str | None = None
    cpus: int | None = None
    platform: str | None = None
    python: str | None = None


class DriftBase(_Strict):
    """The untuned base model on the general set (drift from base), or why it could not run."""

    model: str
    sources: list[str] = Field(default_factory=list)
    status: Literal["ok", "failed"]
    error: str | None = None
    general_prompts: int | None = None
    written_answers: int | None = None
    general_texts: int | None = None
    answer_tokens: int | None = None
    general_ppl: float | None = None
    wall_seconds: float | None = None


class ShipCandidate(_Strict):
    name: str
    format: str | None = None
    quant: str | None = None
    size_bytes: int | None = None
    value: float | None = None
    verdict: Literal["chosen", "qualifies", "rejected", "reference"]
    reason: str


class ShipDecision(_Strict):
    """What `ship: auto` picked from a bench's results, and why each artifact was or was not picked (ftedge.choose)."""

    metric: str
    tolerance: float
    unit: Literal["points", "%"]
    reference: str | None = None
    reference_value: float | None = None
    chosen: str | None = None
    within_tolerance: bool
    summary: str
    candidates: list[ShipCandidate] = Field(default_factory=list)


class BenchResults(_Strict):
    """results.json: where and how the bench ran, and one entry per artifact."""

    schema_version: int = Field(SCHEMA, alias="schema")
    ftedge_version: str
    created: str
    subject: str
    target: TargetInfo
    eval: EvalInfo
    speed: SpeedInfo
    reference: str | None = None
    host: HostInfo = Field(default_factory=HostInfo)
    artifacts: list[Entry]
    predictions: dict[str, list[dict[str, Any]]] | None = None
    drift_base: DriftBase | None = None
    ship_decision: ShipDecision | None = None

    def entry(self, name: str) -> Entry | None:
        return next((e for e in self.artifacts if e.name == name), None)

    @property
    def reference_entry(self) -> Entry | None:
        return next((e for e in self.artifacts if e.reference), None)

    def as_json(self) -> dict[str, Any]:
        """The document as written to results.json (``schema`` by its name; the optional sections only when present)."""
        doc = self.model_dump(mode="json", by_alias=True)
        for key in ("predictions", "drift_base", "ship_decision"):
            if doc[key] is None:
                del doc[key]
        if doc["eval"]["data"] is None:
            del doc["eval"]["data"]
        return doc


def parse_results(doc: Any, where: str | Path = "results.json") -> BenchResults:
    """A decoded results.json as :class:`BenchResults`; an unknown key, a bad value or a newer schema is one line naming it."""
    hint = "run `ftedge bench` again to rewrite it"
    if not isinstance(doc, dict):
        raise FtedgeError(f"{where}: not a bench results document (a JSON object)", hint=hint)
    version = doc.get("schema")
    if version != SCHEMA:
        if isinstance(version, int) and version in UPGRADES:
            doc = UPGRADES[version](dict(doc))
        elif isinstance(version, int) and version > SCHEMA:
            raise FtedgeError(
                f"{where}: results schema {version} is newer than this ftedge reads ({SCHEMA})", hint="upgrade ftedge to read it"
            )
        else:
            raise FtedgeError(f"{where}: unknown results schema {version!r} (this ftedge reads {SCHEMA})", hint=hint)
    try:
        return BenchResults.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise FtedgeError(
                f"{where}: unknown key {loc!r} (results schema {SCHEMA} has no such key)",
                hint="a newer ftedge wrote it: upgrade ftedge, or " + hint,
            ) from None
        raise FtedgeError(f"{where}: {loc}: {first['msg']}", hint=hint) from None


def load_results(path: Path) -> BenchResults:
    """Read and check a results.json."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise from_os_error(err, path, action="read") from None
    except ValueError as err:
        raise FtedgeError(f"{path}: not valid JSON ({err})", hint="run `ftedge bench` again to rewrite it") from None
    return parse_results(doc, path)


def write_results(results: BenchResults, path: Path) -> Path:
    """Write results.json atomically, through the schema."""
    atomic.write_json(Path(path), results.as_json())
    return Path(path)
