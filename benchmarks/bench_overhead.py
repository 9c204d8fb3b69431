"""Overhead of ftedge's backends over the raw runtime loops: decode tok/s, same model, one process.

    .venv/bin/python benchmarks/bench_overhead.py                 # embedded SmolLM2-135M, q4_k_m + int4
    .venv/bin/python benchmarks/bench_overhead.py --gguf m.gguf --onnx onnx-dir --threads 4

For llama.cpp, ftedge's ``LlamaCppBackend.generate`` is timed against a raw llama-cpp-python
low-level loop (``llama_decode`` + the C greedy sampler); for onnxruntime-genai,
``OrtGenAIBackend.generate`` against the raw ``og.Generator`` loop. Both sides load the same file
with the same threads, decode the same greedy tokens (checked) from the same prompt, and are timed
alternately (ABAB...) after a warm-up of each, so background load hits both alike. Decode tok/s
= tokens after the first / time from the first token to the last; the median over repeats is
compared. Target: ftedge within 3% of raw. Without --gguf/--onnx, the embedded SmolLM2-135M-Instruct
is converted once (f16 GGUF -> q4_k_m; ORT GenAI builder int4) into $FTEDGE_CACHE/bench-overhead/.
Results: benchmarks/results/bench_overhead.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftedge import atomic  # noqa: E402
from ftedge.basemodel import cache_dir  # noqa: E402
from ftedge.export.gguf import convert_to_gguf, quantize_gguf  # noqa: E402
from ftedge.loader import resolve_base_model  # noqa: E402

TARGET_PCT = 3.0
PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread in a small mountain village."}]


# -- artifacts ---------------------------------------------------------------------
def build_default_artifacts() -> tuple[Path, Path]:
    """q4_k_m GGUF and int4 ONNX of the embedded SmolLM2-135M-Instruct, built once and cached."""

    hf = resolve_base_model("smollm2-135m-instruct")
    out = cache_dir() / "bench-overhead"
    out.mkdir(parents=True, exist_ok=True)
    f16, q4 = out / "smollm2-135m.f16.gguf", out / "smollm2-135m.q4_k_m.gguf"
    if not q4.is_file():
        if not f16.is_file():
            convert_to_gguf(hf, f16, outtype="f16")
        quantize_gguf(f16, q4, "q4_k_m")
    onnx = out / "smollm2-135m-onnx-int4"
    if not (onnx / "genai_config.json").is_file():
        with atomic.atomic_path(onnx) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(hf),
                "-o",
                str(tmp),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(out / "onnx-cache"),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
    return q4, onnx


# -- timing ------------------------------------------------------------------------
def stamps_of(tokens: Iterable[int], sink: list[int]) -> list[float]:
    """Consume a token stream, recording a timestamp as each token arrives."""
    stamps = []
    for tok in tokens:
        stamps.append(time.perf_counter())
        sink.append(int(tok))
    return stamps


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def compare(name: str, ftedge_run: Callable[[list[int]], list[float]], raw_run: Callable[[list[int]], list[float]], repeats: int) -> dict:
    """Warm both up, then time them alternately; medians, overhead and token identity."""
    sides = {"ftedge": ftedge_run, "raw": raw_run}
    tokens: dict[str, list[int]] = {}
    for side, fn in sides.items():  # warm-up, and the greedy tokens each side produces
        tokens[side] = []
        fn(tokens[side])
    rates: dict[str, list[float]] = {"ftedge": [], "raw": []}
    for r in range(repeats):
        order = ("ftedge", "raw") if r % 2 == 0 else ("raw", "ftedge")
        for side in order:
            rates[side].append(decode_rate(sides[side]([])))
    f, w = statistics.median(rates["ftedge"]), statistics.median(rates["raw"])
    overhead = 100.0 * (w - f) / w
    result = {
        "ftedge_tok_s": round(f, 2),
        "raw_tok_s": round(w, 2),
        "overhead_pct": round(overhead, 2),
        "within_target": overhead <= TARGET_PCT,
        "same_tokens": tokens["ftedge"] == tokens["raw"],
        "decoded_tokens": len(tokens["raw"]),
        "samples_tok_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
    }
    print(f"{name:10s} ftedge {f:7.1f} tok/s   raw {w:7.1f} tok/s   overhead {overhead:+.2f}%   same tokens: {result['same_tokens']}")
    return result


# -- llama.cpp ---------------------------------------------------------------------
def bench_llama(path: Path, *, threads: int, tokens: int, repeats: int, n_ctx: int) -> dict:
    import llama_cpp as lib

    from ftedge.backends.llamacpp import FLASH_ATTN_TYPES, LlamaCppBackend, extra_bufts_enabled
    from ftedge.formats.gguf import inspect_gguf

    backend = LlamaCppBackend(path, threads=threads, n_ctx=n_ctx)
    ids = backend.chat_ids(PROMPT)

    # the raw loop: same file, same model/context parameters (incl. the AMX workaround, without
    # which quantized GGUFs segfault on AMX CPUs, and the backend's flash-attention setting: llama.cpp's
    # default is `auto`, the backend's `false`, a different computation), llama_decode + the C greedy sampler
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = extra_bufts_enabled(inspect_gguf(path))
    model = lib.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, min(512, n_ctx), min(512, n_ctx)
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = FLASH_ATTN_TYPES[backend.flash_attn]
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    sampler = lib.llama_sampler_init_greedy()
    prompt = (lib.llama_token * len(ids))(*ids)
    one = (lib.llama_token * 1)()

    def raw(sink: list[int]) -> list[float]:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        if lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")

        def stream():
            for _ in range(tokens):
                tok = lib.llama_sampler_sample(sampler, ctx, -1)
                yield tok
                one[0] = tok
                if lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) != 0:
                    raise RuntimeError("llama_decode failed")

        return stamps_of(stream(), sink)

    def ours(sink: list[int]) -> list[float]:
        return stamps_of(backend.generate(ids, max_new_tokens=tokens, stop_ids=set()), sink)

    try:
        result = compare("llama.cpp", ours, raw, repeats)
    finally:
        lib.llama_sampler_free(sampler)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
        backend.close()
    return {
        "artifact": str(path),
        "prompt_tokens": len(ids),
        "extra_bufts": bool(mparams.use_extra_bufts),
        "flash_attn": backend.flash_attn,
        **result,
    }


# -- onnxruntime-genai -------------------------------------------------------------
def bench_ortgenai(path: Path, *, threads: int, tokens: int, repeats: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from ftedge.backends.ortgenai import OrtGenAIBackend

    backend = OrtGenAIBackend(path, threads=threads)
    ids = backend.chat_ids(PROMPT)

    config = og.Config(str(path))  # the raw loop: same file, same session threads
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    prompt = np.asarray(ids, dtype=np.int32)

    def raw(sink: list[int]) -> list[float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)

        def stream(g):
            while not g.is_done():
                g.generate_next_token()
                yield int(g.get_next_tokens()[0])

        return stamps_of(stream(gen), sink)

    def ours(sink: list[int]) -> list[float]:
        return stamps_of(backend.generate(ids, max_new_tokens=tokens, stop_ids=set()), sink)

    try:
        result = compare("ortgenai", ours, raw, repeats)
    finally:
        backend.close()
    return {"artifact": str(path), "prompt_tokens": len(ids), **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to use (default: embedded SmolLM2 q4_k_m, built once)")
    ap.add_argument("--onnx", type=Path, help="ORT GenAI folder to use (default: embedded SmolLM2 int4, built once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded per repeat")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--only", choices=("llama_cpp", "ortgenai"), help="bench one runtime only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_overhead.json")
    args = ap.parse_args()
    gguf, onnx = args.gguf, args.onnx
    if gguf is None or onnx is None:
        default_gguf, default_onnx = build_default_artifacts()
        gguf, onnx = gguf or default_gguf, onnx or default_onnx
    load_before = os.getloadavg()
    started = time.time()
    runs: dict[str, dict] = {}
    if args.only in (None, "ortgenai"):
        runs["ortgenai"] = bench_ortgenai(onnx, threads=args.threads, tokens=args.tokens, repeats=args.repeats)
    if args.only in (None, "llama_cpp"):
        runs["llama_cpp"] = bench_llama(gguf, threads=args.threads, tokens=args.tokens, repeats=args.repeats, n_ctx=1024)
    doc = {
        "schema": 1,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "what": "decode tok/s of ftedge's backends vs the raw runtime loops, same process, same file, alternating repeats",
        "target_overhead_pct": TARGET_PCT,
        "threads": args.threads,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "seconds": round(time.time() - started, 1),
        **runs,
    }
    atomic.write_json(args.out, doc)
    print(f"saved {args.out}")
    return 0 if all(r["within_target"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
