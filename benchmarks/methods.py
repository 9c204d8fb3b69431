"""The PEFT methods on the demo task: accuracy, train tok/s, adapter size.

Runs each method's shipped recipe (recipes/smollm2-banking77.yaml for LoRA, -dora, -ia3,
-prefix: SmolLM2-135M-Instruct, NF4 QLoRA, the demo's data, batch and schedule; IA3 and prefix
tuning at lr 1e-2, the others at 1e-3) for the same number of steps, then benches the PyTorch
reference (base NF4 + adapter) on the same held-out rows: exact-match accuracy of the greedy
answer. Train tok/s is the train stage's own figure (all tokens of the packed/padded rows
processed per second of training). Adapter size is the adapter's safetensors file.

    .venv/bin/python benchmarks/methods.py                 # the demo's 150 steps, 200 held-out rows
    .venv/bin/python benchmarks/methods.py --steps 40 --eval 150 --methods lora dora
    .venv/bin/python benchmarks/methods.py -o quant.compute_dtype=float32   # CPUs without AVX512-BF16/AMX

Writes benchmarks/results/methods.json (with the machine's load average, which makes tok/s
loose on a shared machine) and prints the table in docs/methods.md. Runs go to benchmarks/work/methods/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "lora": "smollm2-banking77.yaml",
    "dora": "smollm2-banking77-dora.yaml",
    "ia3": "smollm2-banking77-ia3.yaml",
    "prefix": "smollm2-banking77-prefix.yaml",
}


def run_method(method: str, steps: int, n_eval: int, work: Path, extra: list[str]) -> dict:
    from safetensors import safe_open

    from ftedge.bench.stage import SpeedConfig, bench_run
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.targets import load_target
    from ftedge.train import train_stage

    overrides = [
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        f"eval.max_examples={n_eval}",
        "eval.artifacts=[]",  # the PyTorch reference only: the adapter itself, before any merge
        "eval.drift=false",
        *extra,
    ]
    recipe = load_recipe(ROOT / "recipes" / RECIPES[method], overrides)
    run_dir = work / method
    shutil.rmtree(run_dir, ignore_errors=True)
    run = Run.create(recipe, run_dir=run_dir)
    load_before = os.getloadavg()
    train = train_stage(run)
    doc = bench_run(run, load_target(recipe.export.target), speed=SpeedConfig(decode_tokens=16, repeats=1, warmup=0))
    ref = next(e for e in doc["artifacts"] if e["name"] == "pytorch")
    weights = run.artifact_path("adapter") / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        params = sum(_numel(fh, k) for k in fh.keys())
    return {
        "method": method,
        "recipe": f"recipes/{RECIPES[method]}",
        "lr": recipe.train.lr,
        "steps": train["steps"],
        "examples": train["examples"],
        "accuracy": ref["accuracy"],
        "n_eval": ref.get("n_examples"),
        "eval_loss": train["best_eval_loss"],
        "train_tok_s": train["tokens_per_s"],
        "train_seconds": train["seconds"],
        "adapter_bytes": weights.stat().st_size,
        "adapter_params": params,
        "load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "run": str(run.path),
    }


def _numel(fh, key: str) -> int:
    n = 1
    for d in fh.get_slice(key).get_shape():
        n *= d
    return n


def table(rows: list[dict]) -> str:
    out = [
        "| method | lr | accuracy | eval loss | train tok/s | adapter | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        out.append(
            f"| {r['method']} | {r['lr']:g} | {acc} | {r['eval_loss']:.3f} | {r['train_tok_s']:.0f} | "
            f"{r['adapter_bytes'] / 1e6:.2f} MB | {r['adapter_params']:,} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval", type=int, default=200, help="held-out rows to score")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.json")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "methods")
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every method (e.g. quant.compute_dtype=float32)",
    )
    args = parser.parse_args()
    from ftedge.logs import setup_logging

    setup_logging(False)
    rows = []
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        rows.append(run_method(method, args.steps, args.eval, args.work, args.override))
        print(json.dumps(rows[-1]), flush=True)
        doc = {  # written after each method: a long run stopped part-way keeps what it measured
            "host": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "steps": args.steps,
            "n_eval": args.eval,
            "overrides": args.override,
            "minutes": round((time.time() - started) / 60, 1),
            "methods": rows,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
