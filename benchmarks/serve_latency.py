"""Latency through ``ftedge serve`` (HTTP, server-sent events) vs the in-process backend: TTFT and decode tok/s.

    .venv/bin/python benchmarks/serve_latency.py runs/<run>/ship/<model>.gguf --threads 2
    .venv/bin/python benchmarks/serve_latency.py runs/<run>/onnx/int4 --threads 2 --tokens 64 --repeats 7

Both sides load the same artifact with the same threads and context and decode the same greedy tokens
(checked) from the same chat prompt: in-process with ``Backend.generate`` (as ``ftedge bench`` does),
over HTTP with a streaming ``/v1/chat/completions`` request to an ``ftedge serve`` subprocess on a free
localhost port. They run alternately (ABAB...) after a warm-up of each, so background load hits both alike.
TTFT = request (or call) to the first token's text; decode tok/s = tokens after the first / time from the
first token to the last. Medians over the repeats. Results: benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftedge import atomic  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread in a small mountain village."


def start_server(artifact: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str, int]:
    cmd = [
        sys.executable,
        "-m",
        "ftedge.cli",
        "serve",
        str(artifact),
        "--port",
        "0",
        "--threads",
        str(threads),
        "--ctx",
        str(n_ctx),
        "--system",
        "",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        found = re.search(r"on http://(127\.0\.0\.1):(\d+)", line)
        if found:
            return proc, found.group(1), int(found.group(2))
    raise SystemExit(f"ftedge serve did not start: {proc.stderr.read()[-2000:]}")


def http_run(host: str, port: int, messages: list[dict], tokens: int) -> tuple[float, list[float], str, int]:
    """(request start, arrival time of each text chunk, text, completion tokens) of one streamed reply."""
    body = json.dumps({"messages": messages, "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    stamps: list[float] = []
    text, n = [], 0
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                stamps.append(time.perf_counter())
                text.append(choice["delta"]["content"])
    conn.close()
    return t0, stamps, "".join(text), n


def local_run(backend, messages: list[dict], tokens: int) -> tuple[float, list[float], str, int]:
    """The same, in-process: chat template + tokenize + greedy generate, one stamp per token."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    reply = backend.stream(backend.chat_ids(messages), max_new_tokens=tokens)
    for _ in reply.pieces():  # the stream serve decodes with
        stamps.append(time.perf_counter())
    return t0, stamps, reply.text(), len(stamps)


def summarize(runs: list[tuple[float, list[float], str, int]]) -> dict:
    ttft = [(s[0] - t0) * 1000 for t0, s, _, _ in runs if s]
    rates = [(n - 1) / (s[-1] - s[0]) for _, s, _, n in runs if n > 1 and len(s) > 1 and s[-1] > s[0]]
    return {
        "ttft_ms_median": round(statistics.median(ttft), 2),
        "decode_tok_s_median": round(statistics.median(rates), 2) if rates else None,
        "tokens": runs[0][3],
        "ttft_ms": [round(x, 2) for x in ttft],
        "decode_tok_s": [round(x, 2) for x in rates],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="a .gguf, an ORT GenAI folder, a run or a ship/ folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded per repeat (fewer if the model ends its turn)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_latency.json")
    args = ap.parse_args()

    from ftedge.backends import load_backend
    from ftedge.backends.base import detect_format
    from ftedge.serve import resolve_artifact

    path, _ = resolve_artifact(args.artifact)
    messages = [{"role": "user", "content": args.prompt}]  # no system prompt on either side (the server runs with --system "")
    kwargs = {"n_ctx": args.ctx} if detect_format(path) == "gguf" else {}
    backend = load_backend(path, threads=args.threads, **kwargs)
    proc, host, port = start_server(path, args.threads, args.ctx)
    try:
        local_run(backend, messages, args.tokens)  # warm-up of each
        http_run(host, port, messages, args.tokens)
        local, remote = [], []
        for _ in range(args.repeats):
            local.append(local_run(backend, messages, args.tokens))
            remote.append(http_run(host, port, messages, args.tokens))
        same = all(r[2] == local[0][2] for r in local + remote)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        backend.close()
    a, b = summarize(local), summarize(remote)
    doc = {
        "what": "ftedge serve (HTTP/SSE) vs in-process backend: TTFT and decode tok/s, medians",
        "artifact": str(args.artifact),
        "model_file": path.name,
        "threads": args.threads,
        "repeats": args.repeats,
        "ctx": args.ctx,
        "prompt": args.prompt,
        "same_text": same,
        "in_process": a,
        "http": b,
        "ttft_overhead_ms": round(b["ttft_ms_median"] - a["ttft_ms_median"], 2),
        "decode_ratio": round(b["decode_tok_s_median"] / a["decode_tok_s_median"], 4)
        if a["decode_tok_s_median"] and b["decode_tok_s_median"]
        else None,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(args.out, doc)
    print(f"{path.name}, {args.threads} threads, {a['tokens']} tokens, median of {args.repeats}:")
    print(f"  in-process  TTFT {a['ttft_ms_median']:8.1f} ms   decode {a['decode_tok_s_median']} tok/s")
    print(f"  HTTP (SSE)  TTFT {b['ttft_ms_median']:8.1f} ms   decode {b['decode_tok_s_median']} tok/s")
    print(f"  same text on both sides: {same}; written to {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
