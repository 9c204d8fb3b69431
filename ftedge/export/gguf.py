"""HF folder -> GGUF f16 (llama.cpp's converter, packaged as ``convert-hf-to-gguf``) -> quant types.

* f16: ``python -m convert_hf_to_gguf`` in a subprocess (no llama.cpp checkout, no network);
  the converter is llama.cpp's own script, run in its own process so its memory and any
  ``sys.exit`` stay out of ours.
* quant types: ``llama_cpp.llama_model_quantize`` from the f16 file. Rows whose length is not
  a multiple of 256 cannot hold k-quants; llama.cpp then falls back per tensor (q5_0/q8_0),
  which we collect from its log and report.
* every file is read back with the ``gguf`` reader: the chat template, BOS/EOS and the
  end-of-turn token must be in the metadata.

All files are written to a temp path and renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ftedge.atomic import atomic_path
from ftedge.backends.llamacpp import GgufInfo, capture_native_log, inspect_gguf
from ftedge.errors import FtedgeError

log = logging.getLogger(__name__)

# Converter output types (no llama.cpp quantization needed).
CONVERTER_TYPES = ("f32", "f16", "bf16")

# Quant type name -> llama_ftype constant name in llama_cpp.
FTYPES: dict[str, str] = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
VALID_TYPES = (*CONVERTER_TYPES, *FTYPES)

_FALLBACK = re.compile(r"(\S+)\s+-\s+ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)\s+->\s+falling back to\s+(\w+)")


@dataclass
class QuantReport:
    """What quantization did: the type asked for, and per-tensor fallbacks llama.cpp chose."""

    quant: str
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        by_type: dict[str, int] = {}
        for f in self.fallbacks:
            key = f"{f['wanted']}->{f['used']}"
            by_type[key] = by_type.get(key, 0) + 1
        return {"fallback_tensors": len(self.fallbacks), "fallbacks": by_type}


def check_quant_type(quant: str) -> str:
    q = quant.lower()
    if q not in VALID_TYPES:
        raise FtedgeError(f"unknown GGUF quant type {quant!r}", hint=f"use one of {', '.join(VALID_TYPES)}")
    return q


def gguf_name(merged_dir: Path, quant: str) -> str:
    return f"model-{quant}.gguf"


def _disk_error(err: OSError, path: Path) -> FtedgeError:
    return FtedgeError(f"cannot write {path} ({err.strerror or err})", hint="free disk space or pick another run folder; nothing was recorded")


def convert_to_gguf(hf_dir: Path, out_path: Path, *, outtype: str = "f16", timeout: float | None = None) -> Path:
    """Convert an HF folder (safetensors) to one GGUF file of ``outtype`` (f32/f16/bf16), atomically."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in CONVERTER_TYPES:
        raise FtedgeError(f"the converter writes {', '.join(CONVERTER_TYPES)}, not {outtype!r}")
    if not (hf_dir / "config.json").is_file():
        raise FtedgeError(f"{hf_dir} is not an HF model folder (no config.json)", hint="run `ftedge merge RUN` first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    try:
        with atomic_path(out_path) as tmp:
            cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
            log.info("converting %s to GGUF %s", hf_dir, outtype)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            if proc.returncode != 0 or not tmp.is_file():
                tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
                if "No space left" in (proc.stderr or ""):
                    raise FtedgeError(f"disk full while writing {out_path}", hint="free disk space; nothing was recorded")
                raise FtedgeError(f"GGUF conversion of {hf_dir} failed (exit {proc.returncode}): {tail[0][:300]}", hint="check that the architecture is supported: `python -m convert_hf_to_gguf --print-supported-models`")
            inspect_gguf(tmp)  # complete and readable before it takes the final name
    except OSError as err:
        raise _disk_error(err, out_path) from None
    return out_path


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> QuantReport:
    """Quantize a float GGUF to ``quant`` with llama.cpp, atomically; report per-tensor fallbacks."""
    import llama_cpp

    quant = check_quant_type(quant)
    if quant in CONVERTER_TYPES:
        raise FtedgeError(f"{quant} is written by the converter, not by quantization")
    inspect_gguf(src)
    ftype = getattr(llama_cpp, FTYPES[quant], None)
    if ftype is None:
        raise FtedgeError(f"this llama-cpp-python build has no {quant} quantization", hint=f"use one of {', '.join(q for q in FTYPES if hasattr(llama_cpp, FTYPES[q]))}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or min(4, os.cpu_count() or 1)
    report = QuantReport(quant)
    try:
        with atomic_path(dst) as tmp, capture_native_log() as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0 or not tmp.is_file():
                text = "".join(lines)
                if "No space left" in text or "failed to write" in text:
                    raise FtedgeError(f"disk full while writing {dst}", hint="free disk space; nothing was recorded")
                last = [ln for ln in text.splitlines() if "error" in ln.lower()][-1:] or [f"code {rc}"]
                raise FtedgeError(f"llama.cpp could not quantize {src.name} to {quant}: {last[0].strip()[:300]}")
            inspect_gguf(tmp)
    except OSError as err:
        raise _disk_error(err, dst) from None
    for m in _FALLBACK.finditer("".join(lines)):
        report.fallbacks.append({"tensor": m.group(1), "ncols": m.group(2), "wanted": m.group(4).lower(), "used": m.group(5).lower()})
    if report.fallbacks:
        log.info("%s: %d tensors fell back from k-quants (rows not divisible by 256): %s", dst.name, len(report.fallbacks), report.summary()["fallbacks"])
    return report


def check_metadata(info: GgufInfo, *, end_of_turn_id: int | None) -> dict[str, object]:
    """The chat template, BOS/EOS and the end-of-turn token must be in the GGUF metadata."""
    problems = []
    if not info.chat_template:
        problems.append("no tokenizer.chat_template")
    bos, eos, eot = info.token_id("bos"), info.token_id("eos"), info.token_id("eot")
    if bos is None:
        problems.append("no tokenizer.ggml.bos_token_id")
    if eos is None:
        problems.append("no tokenizer.ggml.eos_token_id")
    if end_of_turn_id is not None and end_of_turn_id not in (eos, eot):
        problems.append(f"end-of-turn token {end_of_turn_id} is neither eos ({eos}) nor eot ({eot})")
    if problems:
        raise FtedgeError(f"{info.path}: incomplete metadata: {'; '.join(problems)}", hint="the merged model's tokenizer/generation config lacks them; re-run `ftedge merge --force`")
    return {"chat_template": True, "bos": bos, "eos": eos, "eot": eot if eot is not None else eos}


def add_eot_token(path: Path, eot_id: int) -> None:
    """Rewrite ``path`` with ``tokenizer.ggml.eot_token_id`` added (atomically)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch_name, endianess=reader.endianess)
        new = {gguf.Keys.Tokenizer.EOT_ID: MetadataDetails(gguf.GGUFValueType.UINT32, int(eot_id))}
        copy_with_new_metadata(reader, writer, new, [])
    del reader


def end_of_turn_id(hf_dir: Path) -> int | None:
    """The end-of-turn token the merged model stops on (generation_config eos, first entry)."""
    import json

    gen = Path(hf_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    return None


def build_f16(hf_dir: Path, out_path: Path) -> tuple[Path, dict[str, object]]:
    """HF -> GGUF f16 with verified metadata (the end-of-turn token added when the converter left it out)."""
    convert_to_gguf(hf_dir, out_path, outtype="f16")
    eot = end_of_turn_id(hf_dir)
    info = inspect_gguf(out_path)
    if eot is not None and eot not in (info.token_id("eos"), info.token_id("eot")):
        log.info("%s: adding end-of-turn token id %d to the metadata", out_path.name, eot)
        add_eot_token(out_path, eot)
        info = inspect_gguf(out_path)
    return out_path, check_metadata(info, end_of_turn_id=eot)


def build_quant(f16_path: Path, out_path: Path, quant: str, *, end_of_turn: int | None, threads: int | None = None) -> tuple[Path, QuantReport, dict[str, object]]:
    report = quantize_gguf(f16_path, out_path, quant, threads=threads)
    meta = check_metadata(inspect_gguf(out_path), end_of_turn_id=end_of_turn)
    return out_path, report, meta
