"""Export target profiles (``export/*.yaml``): formats, quant types, threads and budgets."""

from __future__ import annotations

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
