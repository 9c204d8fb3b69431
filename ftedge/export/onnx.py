"""HF folder -> onnxruntime-genai folder for CPU (fp32, int8, int4), with GPTQ for 4-bit.

``export_onnx(merged_dir, out_dir, precision, calibration_texts=...)`` runs onnxruntime-genai's
model builder in a subprocess (``HF_HUB_OFFLINE=1``, its cache in a temp folder beside the
output, removed afterwards), repairs the builder's int8 shared-embedding wiring, re-quantizes
4-bit weights with GPTQ when calibration text is given (``ftedge.export.gptq``), checks the
folder (genai_config.json, tokenizer, chat template, loads and runs in onnxruntime-genai) and
only then renames it into place. fp16 is not offered: the builder has no FP16 CPU build.

4-bit recipe (``int4``): int4 MatMulNBits, block size 32, asymmetric (per-block zero points),
``accuracy_level`` 4 (the builder's CPU default); the LM head int8 and the embedding table
sharing it (GatherBlockQuantized, 8 bits); every body weight re-quantized with GPTQ on the
calibration texts. Measured on SmolLM2-135M-Instruct (60 BANKING77 chat prompts incl. the label,
3,216 positions, reference = PyTorch float32; "answer" = positions predicting the label tokens;
2 shared CPU threads, so build times are loose):

=========================================  =======  ======  =====  =========  ========
variant                                    size MB  top-1   KL     top-1 ans  KL ans
=========================================  =======  ======  =====  =========  ========
fp32 (builder)                             540      1.000   0.000  1.000      0.000
int8 (builder)                             259      (not re-measured; DESIGN.md: = PyTorch)
int4 builder default (RTN sym, int4 head)  86.5     0.620   0.475  0.503      0.627
int4 RTN sym, int8 head+embedding          100.7    0.627   0.390  0.534      0.504
int4 RTN asym, int8 head+embedding         103.3    0.578   0.411  0.566      0.447
**int4 (default): GPTQ asym + int8 head**  103.3    0.832   0.076  0.754      0.118
GGUF q4_k_m (llama.cpp; mostly q5_0/q8_0)  105.5    0.776   0.073  0.813      0.078
=========================================  =======  ======  =====  =========  ========

GPTQ build of that int4: builder 17 s + calibration forward (6,144 tokens, 128 texts) + GPTQ of 150
weights = 13 min on a heavily shared 2-core machine (load ~8); decode 39 tok/s with 2 threads (loaded).
GPTQ cuts KL ~5x vs RTN at the same size; the remaining gap to q4_k_m is on the label positions.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftedge.atomic import atomic_path
from ftedge.errors import FtedgeError, check_free_space, from_os_error, os_error_in
from ftedge.formats.chat_template import folder_chat_template, write_chat_template
from ftedge.formats.quants import BYTES_PER_WEIGHT, check_onnx_precision

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
# builder --extra_options per precision; int4 keeps the LM head (and the tied embedding) at int8
_EXTRA = {
    "fp32": [],
    "int8": [],
    "int4": [f"block_size={BLOCK_SIZE}", "is_symmetric=false", "matmul_mixed_precision=last_matmul:int8"],
    "int4-rtn": [],  # the builder's own default, kept for comparisons
}
BUILDER_TIMEOUT_S = 3600


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _check_source(merged_dir: Path) -> None:
    if not (merged_dir / "config.json").is_file():
        raise FtedgeError(f"{merged_dir} is not an HF model folder (no config.json)", hint="run `ftedge merge RUN` first")
    if not any(merged_dir.glob("*.safetensors")):
        raise FtedgeError(f"{merged_dir} has no .safetensors weights", hint="re-run `ftedge merge RUN --force`")


def run_builder(merged_dir: Path, out: Path, precision: str, cache: Path, *, timeout: float = BUILDER_TIMEOUT_S) -> None:
    """Run onnxruntime-genai's model builder (CPU) into ``out``; one-line error with its last error line.

    A cause the user can fix (no space, read-only, no permission) found in its output is raised as that OSError.
    """
    base = "int4" if precision.startswith("int4") else precision
    cmd = [
        sys.executable,
        "-m",
        "ftedge.export.ort_builder",  # the builder, with Gemma 3's rope config flattened for it
        "-i",
        str(merged_dir),
        "-o",
        str(out),
        "-p",
        base,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    if _EXTRA[precision]:
        cmd += ["--extra_options", *_EXTRA[precision]]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    log.info("ONNX builder: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, cwd=cache, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FtedgeError(f"ONNX builder timed out after {timeout:.0f}s on {merged_dir}") from None
    if proc.returncode != 0:
        msg = _last_error_line(proc.stderr + "\n" + proc.stdout)
        cause = os_error_in(proc.stderr + "\n" + proc.stdout, out.parent)  # the builder's own words, else a full disk
        if cause is not None:
            raise cause  # the caller's atomic write names the artifact (``out`` is its temp folder)
        raise FtedgeError(
            f"ONNX builder failed on {merged_dir} ({precision}): {msg}",
            hint="check that the model architecture is supported by onnxruntime-genai",
        )
    if not (out / "genai_config.json").is_file():
        raise FtedgeError(f"ONNX builder wrote no genai_config.json for {merged_dir}: {_last_error_line(proc.stderr + proc.stdout)}")


def repair_dangling_inputs(onnx_dir: Path) -> int:
    """Point node inputs the builder left dangling at the initializers it meant (returns how many).

    onnxruntime-genai 0.18 wires the int8 shared embedding (GatherBlockQuantized) to
    ``X_Q8G32`` / ``X_scale`` / ``X_zp`` while the LM head's initializers are named
    ``X_Q8`` / ``X_scales`` / ``X_zero_points``; the model then fails to load.
    """
    import onnx

    path = onnx_dir / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    known = {i.name for i in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output} | {""}
    renames = {"_Q8G32": "_Q8", "_Q4G32": "_Q4", "_scale": "_scales", "_zp": "_zero_points"}
    fixed = 0
    for node in g.node:
        for idx, name in enumerate(node.input):
            if name in known:
                continue
            for old, new in renames.items():
                if name.endswith(old) and name[: -len(old)] + new in known:
                    node.input[idx] = name[: -len(old)] + new
                    fixed += 1
                    break
            else:
                raise FtedgeError(
                    f"ONNX builder output {path} is broken: node {node.name} reads undefined tensor {name}",
                    hint="try another precision or report it",
                )
    if fixed:
        onnx.save_model(proto, str(path))
        log.info("repaired %d dangling input(s) in %s", fixed, path)
    return fixed


def check_folder(folder: Path, source: Path | None = None) -> None:
    """genai_config.json, tokenizer and (if the source has one) chat template present; loads and runs."""
    from ftedge.backends.ortgenai import OrtGenAIBackend

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise FtedgeError(f"ONNX export {folder} has no tokenizer", hint="give a merged folder with tokenizer files")
    template = folder_chat_template(source) if source is not None else None
    if template is not None and folder_chat_template(folder) is None:
        write_chat_template(folder, template)
    with OrtGenAIBackend(folder, threads=1) as be:
        ids = be.tokenize("Hello")
        if not ids:
            raise FtedgeError(f"ONNX export {folder}: the tokenizer returns no ids")
        out = be.logits(ids)
        if not (out.shape[0] == len(ids) and bool(abs(out).sum() > 0) and not bool((out != out).any())):
            raise FtedgeError(f"ONNX export {folder}: logits are empty or NaN")


def _with_progress(description: str, fn):
    """Run ``fn(step)`` under a transient rich progress line; ``step()`` advances it by one weight."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        return fn(lambda: bar.advance(task))


def _gptq(folder: Path, merged_dir: Path, calibration_texts: list[str] | None, threads: int | None) -> None:
    texts = [t for t in (calibration_texts or []) if t.strip()]
    if not texts:
        log.warning("int4 ONNX without calibration texts: round-to-nearest weights (expect an accuracy loss)")
        return
    from ftedge.export.gptq import requantize_onnx

    t1 = time.time()
    counts = _with_progress(
        f"GPTQ 4-bit ({len(texts)} calibration texts)",
        lambda step: requantize_onnx(folder, merged_dir, texts, threads=threads, progress=step),
    )
    log.info("GPTQ on %d calibration texts: %s in %.1fs", len(texts), counts, time.time() - t1)


def export_onnx(
    merged_dir: Path, out_dir: Path, precision: str, *, calibration_texts: list[str] | None = None, threads: int | None = None
) -> Path:
    """Build ``out_dir`` (an ORT GenAI folder for CPU) from the HF folder ``merged_dir``; atomic.

    ``int4`` uses GPTQ on ``calibration_texts`` (chat-formatted training/validation text) when given,
    otherwise RTN (with a warning: expect a large accuracy loss on small models).
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    precision = check_onnx_precision(precision)
    _check_source(merged_dir)
    from ftedge.basemodel import parameter_count

    t0 = time.time()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(out_dir.parent, int(parameter_count(merged_dir) * BYTES_PER_WEIGHT[precision]), f"the ONNX {precision} export")
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.build-", dir=out_dir.parent) as work, atomic_path(out_dir) as tmp:
            cache = Path(work) / "cache"
            cache.mkdir()
            run_builder(merged_dir, tmp, precision, cache)
            shutil.rmtree(cache, ignore_errors=True)
            repair_dangling_inputs(tmp)
            if precision == "int4":
                _gptq(tmp, merged_dir, calibration_texts, threads)
            check_folder(tmp, merged_dir)
    except OSError as err:
        raise from_os_error(err, out_dir) from None
    log.info("ONNX %s export of %s in %.1fs", precision, merged_dir, time.time() - t0)
    return out_dir
