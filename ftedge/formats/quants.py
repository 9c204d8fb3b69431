"""The quant vocabulary: every GGUF type and ONNX precision ftedge builds, in one place.

GGUF types are named as llama.cpp's tools name them: the lower-cased ``gguf.LlamaFileType``
member without its ``MOSTLY_`` / ``ALL_`` prefix (``MOSTLY_Q4_K_M`` is ``q4_k_m``). gguf-py's
enum is the single source of the numbers (``general.file_type`` in a GGUF's metadata and the
``ftype`` llama.cpp's quantizer takes): nothing here re-types them.

The target schema (``ftedge.targets``) accepts exactly these names, so a type the exporters
cannot build fails at ``ftedge validate``, before any training.
"""

from __future__ import annotations

import gguf

from ftedge.errors import FtedgeError

# Written by llama.cpp's converter straight from the HF weights.
GGUF_CONVERTER_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")
# Made from the f16 GGUF by llama.cpp's quantizer.
GGUF_QUANT_TYPES: tuple[str, ...] = (
    "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m", "q2_k",
)  # fmt: skip
GGUF_TYPES: tuple[str, ...] = GGUF_CONVERTER_TYPES + GGUF_QUANT_TYPES

# onnxruntime-genai builder precisions for CPU. ``int4`` is re-quantized with GPTQ; ``int4-rtn`` is
# the builder's own round-to-nearest int4, kept for comparisons. The builder has no fp16 CPU build.
ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "int8", "int4", "int4-rtn")

# Bytes per weight of what the exporters write from a float model (a lower bound for the int types:
# scales and the int8 head come on top): the free space a write needs is checked against it first.
BYTES_PER_WEIGHT: dict[str, float] = {"f32": 4, "f16": 2, "bf16": 2, "fp32": 4, "int8": 1, "int4": 0.5, "int4-rtn": 0.5}

# (min_top1, max_kl) per type when the target profile does not set a gate.
DEFAULT_GATES: dict[str, tuple[float, float]] = {
    "f32": (0.99, 0.01),
    "f16": (0.99, 0.01),
    "bf16": (0.98, 0.02),
    "q8_0": (0.97, 0.03),
    "q6_k": (0.95, 0.06),
    "q5_k_m": (0.92, 0.10),
    "q5_k_s": (0.92, 0.10),
    "q5_0": (0.92, 0.10),
    "q5_1": (0.92, 0.10),
    "q4_k_m": (0.85, 0.25),
    "q4_k_s": (0.85, 0.25),
    "q4_0": (0.85, 0.25),
    "q4_1": (0.85, 0.25),
    "q3_k_m": (0.75, 0.50),
    "q2_k": (0.60, 1.00),
    "fp32": (0.99, 0.01),
    "int8": (0.95, 0.05),
    "int4": (0.85, 0.25),
    "int4-rtn": (0.75, 0.50),
}


def _member(quant: str) -> str:
    return ("ALL_" if quant == "f32" else "MOSTLY_") + quant.upper()


def gguf_file_type(quant: str) -> int:
    """``general.file_type`` / llama.cpp ``ftype`` number of a GGUF type name (``q4_k_m`` -> 15)."""
    return int(gguf.LlamaFileType[_member(check_gguf_type(quant))])


def gguf_type_name(file_type: int) -> str | None:
    """The type name of a ``general.file_type`` number (15 -> ``q4_k_m``); None when unknown."""
    try:
        member = gguf.LlamaFileType(int(file_type))
    except ValueError:
        return None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def check_gguf_type(quant: str) -> str:
    """The lower-cased GGUF type name, or a one-line error listing the valid ones."""
    q = str(quant).lower()
    if q not in GGUF_TYPES:
        raise FtedgeError(f"unknown GGUF quant type {quant!r}", hint=f"use one of {', '.join(GGUF_TYPES)}")
    return q


def check_onnx_precision(precision: str) -> str:
    p = str(precision).lower()
    if p not in ONNX_PRECISIONS:
        why = "the onnxruntime-genai builder has no FP16 CPU build; " if p in ("fp16", "bf16") else ""
        raise FtedgeError(f"unsupported ONNX precision {precision!r}", hint=f"{why}use one of {', '.join(ONNX_PRECISIONS)}")
    return p


def is_float_type(quant: str | None) -> bool:
    return quant in ("f32", "f16", "bf16", "fp32")
