"""Does a merged fine-tune survive being quantized to NF4 again? Greedy accuracy of a run's merged model
loaded in float and loaded in 4 bits (bitsandbytes NF4 + double quant, as `train.method: qlora` loads a base),
on the first test rows of the run's own split.

    .venv/bin/python benchmarks/requantize_merged.py benchmarks/work/methods/lora --rows 100

Why it matters: `train.init_from` a run starts the new adapter from that run's merged model. With
`train.method: qlora` that model would be quantized to NF4 again, and a LoRA fine-tune's change to each weight
is mostly smaller than NF4's rounding step. ftedge refuses that combination (`ftedge.validate.check_method`);
this benchmark is the measurement behind it. Results: benchmarks/results/requantize_merged.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftedge import atomic  # noqa: E402

NF4 = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def accuracy(model_dir: Path, examples: list, *, four_bit: dict | None, threads: int) -> dict:
    from ftedge.backends.torch import TorchBackend
    from ftedge.bench.measures import decode_answer

    started = time.perf_counter()
    backend = TorchBackend(model_dir, threads=threads, four_bit=four_bit)
    budget = max(len(backend.tokenize(e.target)) for e in examples) + 8
    right = sum(decode_answer(backend, backend.chat_ids(e.messages), budget)[0].strip() == e.target for e in examples)
    seconds = round(time.perf_counter() - started, 1)
    return {"right": right, "rows": len(examples), "accuracy": round(right / len(examples), 4), "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a trained run folder (merged first if needed)")
    parser.add_argument("--rows", type=int, default=100, help="first test rows to answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "requantize_merged.json")
    args = parser.parse_args()
    from ftedge import commands
    from ftedge.data.splits import run_splits
    from ftedge.logs import setup_logging
    from ftedge.manifest import Run

    setup_logging(False)
    run = Run.open(args.run)
    merged = commands.merge(run.path)  # skipped when done
    examples = run_splits(run).test[: args.rows]  # the test rows frozen into the run
    result = {
        "schema": 1,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": str(run.path),
        "merged": str(merged),
        "float": accuracy(merged, examples, four_bit=None, threads=args.threads),
        "nf4": accuracy(merged, examples, four_bit=NF4, threads=args.threads),
        "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    atomic.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("float", "nf4")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
