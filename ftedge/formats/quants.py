"""The quant vocabulary: every GGUF type and ONNX precision ftedge builds, in one place.

GGUF types are named as llama.cpp's tools name them: the lower-cased ``gguf.LlamaFileType``
member without its ``MOSTLY_`` / ``ALL_`` prefix (``MOSTLY_Q4_K_M`` is ``q4_k_m``). gguf-py's
enum is the single source of the numbers (``general.file_type`` in a GGUF's metadata and the
``ftype`` llama.cpp's quantizer takes): nothing here re-types them.

The target schema (``ftedge.targets``) accepts exactly these names, so a type the exporters
cannot build fails at ``ftedge validate``, before any training.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# -- parity gates -------------------------------------------------------------------------------------------------
# An artifact is judged against the merged model by KL(merged || artifact) per scored position (mean and 99th
# percentile) and by top-1 agreement on the positions where the merged model is confident: its top token leads the
# runner-up by CONFIDENT_MARGIN nats or more. Raw top-1 agreement is reported, not judged: at near-tied positions a
# faithful artifact resolves the tie either way (SmolLM2-135M's q8_0 agrees on 97% of raw positions, 100% of confident).
CONFIDENT_MARGIN = 1.0
MIN_CONFIDENT_POSITIONS = 20  # fewer confident positions than this: the top-1 check is not applied (KL still is)


@dataclass(frozen=True)
class GateDefault:
    max_kl: float  # mean KL per position, nats
    max_kl_p99: float  # 99th percentile of the per-position KL, nats
    min_top1_confident: float  # top-1 agreement on confident positions


# Grounding: llama.cpp's own KL-divergence tool (`llama-perplexity --kl-divergence`), as published in llama.cpp's
# tools/perplexity/README.md (LLaMA 3 8B vs its FP16 logits, Wikitext-2, no imatrix): mean KLD q8_0 0.001355,
# q6_K 0.005452, q5_K_M 0.010762, q5_K_S 0.016595, q5_1 0.018045, q5_0 0.022239, q4_K_M 0.031273, q4_K_S 0.043136,
# q4_1 0.071683, q4_0 0.071940, q3_K_M 0.101913, q2_K 0.445132; "Same top p" q8_0 97.674%, q6_K 96.031%, q4_K_M 91.901%,
# q2_K 71.138% (other types interpolated in log mean KLD between those). The tool's 99th KLD percentile runs at about
# 8-13x its mean (llama.cpp PR #12557: Q5_0 0.1106 vs 0.0123, IQ4_XS 0.3249 vs 0.0425; ik_llama.cpp PR #817: 0.2212 vs
# 0.0175), so the tail is set at 9x the mean limit.
# Scaled for small models: on SmolLM2-135M (16 BANKING77 chat prompts with their labels, 488 positions, float32
# reference, measured for issue 17) the mean KL of each type was 0.9-5.8x the LLaMA 3 8B figure (q8_0 0.0043 = 3.1x,
# q6_k 1.8x, q5_k_m 5.8x, q4_k_m 0.049 = 1.6x, q4_0 3.8x, q3_k_m 1.2x, q2_k 0.9x) and 5-7x in issue 17's 4-step run
# (q8_0 0.0068, q4_k_m 0.208). So: max_kl = 8x llama.cpp's mean KLD (at most 1 nat), max_kl_p99 = 9x max_kl (at most
# 5 nats), min_top1_confident = 1 - 2x llama.cpp's top-1 miss rate. A broken export (wrong weights, tensor layout or
# tokenizer) sits at several nats and fails all three; whether a faithful q2_k is good enough is the bench's question.
# ONNX precisions take the row of the llama.cpp type of the same width and scheme (int8 per-channel: q6_k's, kept a
# step looser than q8_0's block-32 scales; int4 = GPTQ block 32: q4_k_m's; int4-rtn: q4_0's).
_F = GateDefault(0.005, 0.05, 0.99)  # float: llama.cpp's f16 row is 0.000551 (its logit file's own 16-bit rounding)
DEFAULT_GATES: dict[str, GateDefault] = {
    "f32": _F,
    "f16": _F,
    "bf16": GateDefault(0.01, 0.1, 0.98),  # bf16 rounds 8x coarser than f16
    "q8_0": GateDefault(0.011, 0.1, 0.95),
    "q6_k": GateDefault(0.044, 0.39, 0.92),
    "q5_k_m": GateDefault(0.086, 0.77, 0.88),
    "q5_k_s": GateDefault(0.13, 1.2, 0.86),
    "q5_1": GateDefault(0.14, 1.3, 0.86),
    "q5_0": GateDefault(0.18, 1.6, 0.85),
    "q4_k_m": GateDefault(0.25, 2.25, 0.83),
    "q4_k_s": GateDefault(0.35, 3.1, 0.78),
    "q4_1": GateDefault(0.57, 5.0, 0.70),
    "q4_0": GateDefault(0.58, 5.0, 0.70),
    "q3_k_m": GateDefault(0.82, 5.0, 0.65),
    "q2_k": GateDefault(1.0, 5.0, 0.42),
    "fp32": _F,
    "int8": GateDefault(0.044, 0.39, 0.92),
    "int4": GateDefault(0.25, 2.25, 0.83),
    "int4-rtn": GateDefault(0.58, 5.0, 0.70),
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
