"""The PyTorch reference's teacher-forced quality pass: one row at a time vs batched (Backend.logits_batch).

    .venv/bin/python benchmarks/batched_logits.py                  # embedded SmolLM2-135M-Instruct, 50 BANKING77 rows
    .venv/bin/python benchmarks/batched_logits.py --rows 200 --threads 4

Both sides run ``ftedge.bench.measures.measure_quality`` (task perplexity: the teacher-forced pass and its
scoring, no decoding) on the same TorchBackend (float32, as bench's reference runs) and the same rows: the
per-row side through ``Backend.logits_batch``'s default loop (what every runtime did before), the batched side
through TorchBackend's padded batches. Timed alternately (per-row, batched, per-row, batched) after a warm-up;
the answer NLLs of both sides are compared. Results: benchmarks/results/batched_logits.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftedge import atomic  # noqa: E402
from ftedge.backends.base import Backend  # noqa: E402
from ftedge.backends.torch import TorchBackend  # noqa: E402
from ftedge.bench.measures import conversation_ids, measure_quality  # noqa: E402
from ftedge.loader import resolve_base_model  # noqa: E402

SYSTEM = "Classify the customer's message into one BANKING77 intent label. Reply with the label only."


class PerRow(TorchBackend):
    """TorchBackend with the base class's one-row-at-a-time logits_batch."""

    def logits_batch(self, rows, *, start=0):  # type: ignore[no-untyped-def]
        return Backend.logits_batch(self, rows, start=start)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batched_logits.json")
    args = ap.parse_args()
    with open(ROOT / "data" / "banking77" / "train.csv", newline="") as fh:
        data = list(csv.DictReader(fh))
    step = max(1, len(data) // args.rows)
    picked = data[::step][: args.rows]  # spread over the file: many labels, many lengths
    examples = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}], "target": r["category"]}
        for r in picked
    ]
    folder = resolve_base_model(args.model)
    batched = TorchBackend(folder, threads=args.threads)
    per_row = PerRow(folder, threads=args.threads)

    def run(backend: TorchBackend) -> tuple[float, dict]:
        t = time.perf_counter()
        q = measure_quality(backend, examples, task="perplexity", n_ctx=2048)
        return time.perf_counter() - t, q

    run(per_row)  # warm-up
    run(batched)
    times: dict[str, list[float]] = {"per_row": [], "batched": []}
    results = {}
    for _ in range(2):
        for name, backend in (("per_row", per_row), ("batched", batched)):
            sec, results[name] = run(backend)
            times[name].append(sec)
    nll_a = np.array([n for n, _ in results["per_row"]["nll"]])
    nll_b = np.array([n for n, _ in results["batched"]["nll"]])
    tokens = sum(len(conversation_ids(batched, e["messages"], e["target"])[1]) for e in examples)
    best = {k: min(v) for k, v in times.items()}
    out = {
        "what": "measure_quality(task=perplexity) on TorchBackend float32: per-row vs batched logits_batch",
        "model": args.model,
        "rows": len(examples),
        "data": f"data/banking77/train.csv, every {step}-th row",
        "tokens": tokens,
        "threads": args.threads,
        "cpu": cpu_model(),
        "seconds": times,
        "best_seconds": best,
        "speedup": round(best["per_row"] / best["batched"], 2),
        "max_abs_nll_diff": float(np.abs(nll_a - nll_b).max()),
        "perplexity": {k: results[k]["perplexity"] for k in results},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic.write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
