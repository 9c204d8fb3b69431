"""DPO on the demo model's own mistakes: build the preference set from a trained BANKING77 run, then
(``compare``) train DPO from that run and compare held-out accuracy before and after.

    # the preference set of recipes/smollm2-banking77-dpo.yaml, from a trained SFT run (what
    # `ftedge data preferences runs/banking77-sft -o runs/banking77-preferences` does):
    .venv/bin/python benchmarks/dpo_banking77.py build runs/banking77-sft
    # SFT vs SFT+DPO on the held-out rows the SFT run benched (trains the DPO run; --steps for a shorter run;
    # the preference set is reused when --out holds one built alike, --rebuild answers again):
    .venv/bin/python benchmarks/dpo_banking77.py compare runs/banking77-sft --steps 60 [-o quant.compute_dtype=float32]

``build`` is ``ftedge data preferences`` (``ftedge.preferences``): it merges the SFT run if needed and its
merged model answers the first ``--train-rows`` rows of the run's training split greedily (through the
PyTorch backend, up to the end-of-turn token). ``train.jsonl``: the rows it gets wrong, prompt = the
customer's message, chosen = the gold label, rejected = the model's answer; ``val.jsonl`` and
``test.jsonl``: the run's validation and test splits (the rows its bench scores, in order) as pairs,
chosen = gold, rejected = a random other label (the model never answers them; bench scores the chosen
answer only), so the DPO run benches on the SFT run's test rows, not on a held-out part of its own pairs.
Until this change ``val.jsonl`` took the model's own answer as ``rejected`` where it was wrong (the
measured results in benchmarks/results/dpo_banking77*.json were built that way).

``compare`` then runs recipes/smollm2-banking77-dpo.yaml from the SFT run on that set and benches its
PyTorch reference (base + adapter) on the rows the SFT run's own bench scored (its results.json,
PyTorch reference too; checked row by row). Writes benchmarks/results/dpo_banking77.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DPO_RECIPE = ROOT / "recipes" / "smollm2-banking77-dpo.yaml"


def build(sft_dir: Path, out: Path, *, train_rows: int) -> dict[str, Any]:
    from ftedge import commands

    stats = commands.data_preferences(sft_dir, out=out, rows=train_rows)
    print(json.dumps(stats), flush=True)
    return stats


def built_already(sft_dir: Path, out: Path, *, train_rows: int) -> dict[str, Any] | None:
    """The stats of a preference set ``build`` already wrote from the same SFT run with the same settings, else None."""
    from ftedge.manifest import Run
    from ftedge.preferences import SEED

    try:
        stats = json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return None
    same = (stats.get("run"), stats.get("train_rows_answered"), stats.get("seed"))
    if same != (str(Run.open(sft_dir).path), train_rows, SEED):
        return None
    return {**stats, "out": str(out)}


def sft_accuracy(run_dir: Path) -> dict[str, Any]:
    """The SFT run's own bench figure: its PyTorch reference (base + adapter) on its held-out rows."""
    results = run_dir / "bench" / "results.json"
    if not results.is_file():
        raise SystemExit(f"{run_dir} has no bench results: run `ftedge bench {run_dir}` first")
    ref = next(e for e in json.loads(results.read_text())["artifacts"] if e["name"] == "pytorch")
    return {"accuracy": ref["accuracy"], "n": ref.get("n_examples")}


def _same_rows(sft: list[Any], dpo: list[Any]) -> None:
    """The DPO run's bench rows are the SFT run's: same prompts (system prompt included), same gold answers."""
    if len(sft) != len(dpo) or any(a.messages != b.messages or a.target != b.target for a, b in zip(sft, dpo, strict=True)):
        raise SystemExit("the DPO run's test rows differ from the SFT run's: check data.system_prompt of both recipes")


def compare(args: argparse.Namespace) -> None:
    from ftedge import commands
    from ftedge.bench.stage import SpeedConfig, bench_run
    from ftedge.data.splits import load_splits, run_splits
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.targets import load_target

    prefs = args.out
    sft_ref = sft_accuracy(args.sft)
    n_eval = sft_ref["n"]  # the same held-out rows as the SFT run's bench
    built = None if args.rebuild else built_already(args.sft, prefs, train_rows=args.train_rows)
    if built is not None:
        print(f"reusing the preference set in {prefs} (built from the same run; --rebuild to answer again)", flush=True)
    else:
        built = build(args.sft, prefs, train_rows=args.train_rows)
    overrides = [
        f"train.init_from={args.sft.resolve()}",
        f"data.train={prefs / 'train.jsonl'}",
        f"data.val={prefs / 'val.jsonl'}",
        f"data.test={prefs / 'test.jsonl'}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 3)}",
        f"train.save_every={args.steps}",
        f"eval.max_examples={n_eval}",
        "eval.artifacts=[]",
        "eval.drift=false",
        *args.override,
    ]
    run_dir = ROOT / "benchmarks" / "work" / "dpo-banking77"
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    _same_rows(run_splits(Run.open(args.sft)).test[:n_eval], load_splits(load_recipe(DPO_RECIPE, overrides)).test[:n_eval])
    run = commands.train(DPO_RECIPE, overrides, run_dir=run_dir)
    doc = bench_run(run, load_target(run.recipe().export.target), speed=SpeedConfig(decode_tokens=16, repeats=1, warmup=0))
    dpo_ref = next(e for e in doc["artifacts"] if e["name"] == "pytorch")
    records = [json.loads(x) for x in (run.path / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    result = {
        "build": built,
        "dpo": {
            "steps": args.steps,
            "beta": run.recipe().train.beta,
            "sft_weight": run.recipe().train.sft_weight,
            "lr": run.recipe().train.lr,
            "train": run.manifest()["stages"]["train"]["metrics"],
            "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None,
        },
        "accuracy": {"sft": sft_ref["accuracy"], "sft_dpo": dpo_ref["accuracy"], "n": dpo_ref.get("n_examples")},
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out = ROOT / "benchmarks" / "results" / args.result
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["accuracy"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "compare"])
    parser.add_argument("sft", type=Path, help="the trained SFT run folder")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "banking77-preferences")
    parser.add_argument("--train-rows", type=int, default=3000, help="training rows to answer (the mistakes become pairs)")
    parser.add_argument("--steps", type=int, default=60, help="compare: DPO steps")
    parser.add_argument("--rebuild", action="store_true", help="compare: answer the rows again even if --out holds a set built alike")
    parser.add_argument("--result", default="dpo_banking77.json", help="compare: file name under benchmarks/results/")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="compare: DPO recipe override")
    args = parser.parse_args()
    from ftedge.logs import setup_logging

    setup_logging(False)
    if args.command == "build":
        build(args.sft, args.out, train_rows=args.train_rows)
    else:
        compare(args)


if __name__ == "__main__":
    main()
