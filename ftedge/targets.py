"""Export target profiles (``export/*.yaml``): formats, quant types, threads and budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftedge.errors import FtedgeError

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m", "q2_k")
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateThresholds(_Strict):
    min_top1: float = Field(ge=0.0, le=1.0, description="Minimum top-1 next-token agreement with the merged PyTorch model.")
    max_kl: float = Field(ge=0.0, description="Maximum mean KL divergence (reference || artifact), in nats.")


class GgufSpec(_Strict):
    quants: list[str] = Field(default_factory=lambda: ["q4_k_m"], description=f"GGUF types to produce; one of {', '.join(GGUF_QUANTS)}.")


class OnnxSpec(_Strict):
    precisions: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(default_factory=lambda: ["int4"], description="ONNX (onnxruntime-genai, CPU) precisions to produce.")


class Target(_Strict):
    name: str = Field(description="Profile name.")
    description: str = Field("", description="What device this profile stands for.")
    gguf: GgufSpec | None = Field(default_factory=GgufSpec, description="GGUF artifacts (llama.cpp); null = none.")
    onnx: OnnxSpec | None = Field(None, description="ONNX artifacts (onnxruntime-genai); null = none.")
    n_ctx: int = Field(2048, gt=0, description="Context length to load artifacts with.")
    threads: int = Field(2, gt=0, description="CPU threads to benchmark with.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest artifact file size that fits the device (MB); null = no limit.")
    max_ram_mb: float | None = Field(None, gt=0, description="Largest peak resident memory that fits the device (MB); null = no limit.")
    ship: str | None = Field(None, description="Quant type to put in ship/ (default: the first GGUF quant that passes its gate).")
    gates: dict[str, GateThresholds] = Field(default_factory=dict, description="Parity thresholds per quant type (e.g. q4_k_m, int4, fp32); unset types use the built-in defaults.")

    def validate_quants(self, source: str) -> None:
        if self.gguf:
            for q in self.gguf.quants:
                if q.lower() not in GGUF_QUANTS:
                    raise FtedgeError(f"{source}: gguf.quants: unknown quant type {q!r}", hint=f"use one of {', '.join(GGUF_QUANTS)}")


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
    raise FtedgeError(f"unknown target {str(name_or_path)!r}", hint="use one of: " + ", ".join(available_targets()) + " (or a path to a YAML profile)")


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
        raise FtedgeError(f"{path}: {loc}: {first['msg']}", hint="see export/laptop-cpu.yaml for a valid profile") from None
    target.validate_quants(str(path))
    return target
