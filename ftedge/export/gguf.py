"""HF folder -> GGUF f16 (llama.cpp's converter, packaged as ``convert-hf-to-gguf``) -> quant types.

* f16: ``python -m convert_hf_to_gguf`` in a subprocess (no llama.cpp checkout, no network);
  the converter is llama.cpp's own script, run in its own process so its memory and any
  ``sys.exit`` stay out of ours.
* quant types: llama.cpp's quantizer from the f16 file (``ftedge.backends.llamacpp.quantize_gguf``). Rows whose
  length is not a multiple of 256 cannot hold k-quants; llama.cpp then falls back per tensor (q5_0/q8_0),
  which it reports (``QuantReport``).
* every file is read back with ``ftedge.formats.gguf``: the chat template, BOS/EOS and the
  end-of-turn token must be in the metadata (an end-of-turn token the converter left out is added there).

All files are written to a temp path and renamed into place only when complete.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ftedge.atomic import atomic_path
from ftedge.backends.llamacpp import QuantReport, quantize_gguf
from ftedge.errors import FtedgeError, check_free_space, from_os_error, os_error_in
from ftedge.formats.gguf import GgufInfo, add_eot_token, inspect_gguf
from ftedge.formats.quants import BYTES_PER_WEIGHT, GGUF_CONVERTER_TYPES

log = logging.getLogger(__name__)


def convert_to_gguf(hf_dir: Path, out_path: Path, *, outtype: str = "f16", timeout: float | None = None) -> Path:
    """Convert an HF folder (safetensors) to one GGUF file of ``outtype`` (f32/f16/bf16), atomically."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in GGUF_CONVERTER_TYPES:
        raise FtedgeError(f"the converter writes {', '.join(GGUF_CONVERTER_TYPES)}, not {outtype!r}")
    if not (hf_dir / "config.json").is_file():
        raise FtedgeError(f"{hf_dir} is not an HF model folder (no config.json)", hint="run `ftedge merge RUN` first")
    from ftedge.basemodel import parameter_count

    check_free_space(out_path.parent, int(parameter_count(hf_dir) * BYTES_PER_WEIGHT[outtype]), f"the {outtype} GGUF {out_path.name}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    try:
        with atomic_path(out_path) as tmp:
            cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
            log.info("converting %s to GGUF %s", hf_dir, outtype)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            if proc.returncode != 0 or not tmp.is_file():
                tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
                cause = os_error_in(proc.stderr or "", out_path.parent)  # the converter's own words, else a full disk
                if cause is not None:
                    raise from_os_error(cause, out_path)
                raise FtedgeError(
                    f"GGUF conversion of {hf_dir} failed (exit {proc.returncode}): {tail[0][:300]}",
                    hint="check that the architecture is supported: `python -m convert_hf_to_gguf --print-supported-models`",
                )
            inspect_gguf(tmp)  # complete and readable before it takes the final name
    except OSError as err:
        raise from_os_error(err, out_path) from None
    return out_path


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
        raise FtedgeError(
            f"{info.path}: incomplete metadata: {'; '.join(problems)}",
            hint="the merged model's tokenizer/generation config lacks them; re-run `ftedge merge --force`",
        )
    return {"chat_template": True, "bos": bos, "eos": eos, "eot": eot if eot is not None else eos}


def build_f16(hf_dir: Path, out_path: Path, *, end_of_turn: int | None = None) -> tuple[Path, dict[str, object]]:
    """HF -> GGUF f16 with verified metadata (the end-of-turn token added when the converter left it out).

    ``end_of_turn`` defaults to the one the folder's tokenizer ends a turn with (``ftedge.families.end_of_turn_id``).
    """
    from ftedge.families import end_of_turn_id
    from ftedge.loader import load_tokenizer

    convert_to_gguf(hf_dir, out_path, outtype="f16")
    eot = end_of_turn if end_of_turn is not None else end_of_turn_id(load_tokenizer(hf_dir, require_chat_template=False))
    info = inspect_gguf(out_path)
    if eot is not None and eot not in (info.token_id("eos"), info.token_id("eot")):
        log.info("%s: adding end-of-turn token id %d to the metadata", out_path.name, eot)
        add_eot_token(out_path, eot)
        info = inspect_gguf(out_path)
    return out_path, check_metadata(info, end_of_turn_id=eot)


def build_quant(
    f16_path: Path, out_path: Path, quant: str, *, end_of_turn: int | None, threads: int | None = None
) -> tuple[Path, QuantReport, dict[str, object]]:
    report = quantize_gguf(f16_path, out_path, quant, threads=threads)
    meta = check_metadata(inspect_gguf(out_path), end_of_turn_id=end_of_turn)
    return out_path, report, meta
