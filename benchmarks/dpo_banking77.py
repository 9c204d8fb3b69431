"""DPO on the demo model's own mistakes: build the preference set from a trained BANKING77 run, then
(``compare``) train DPO from that run and compare held-out accuracy before and after.

    # the preference set of recipes/smollm2-banking77-dpo.yaml, from a trained SFT run:
    .venv/bin/python benchmarks/dpo_banking77.py build runs/banking77-sft
    # SFT vs SFT+DPO on the held-out rows the SFT run benched (trains the DPO run; --steps for a shorter run;
    # the preference set is reused when --out holds one built alike, --rebuild answers again):
    .venv/bin/python benchmarks/dpo_banking77.py compare runs/banking77-sft --steps 60 [-o quant.compute_dtype=float32]

``build`` merges the SFT run if needed and answers BANKING77 rows greedily with its merged model
(batched transformers ``generate``, the answer up to the end-of-turn token):

- ``train.jsonl``: the first ``--train-rows`` rows of the run's training split that the model gets
  wrong: prompt = the customer's message, chosen = the gold label, rejected = the model's answer;
- ``val.jsonl``: the first ``--val-rows`` rows of the run's validation split, every one of them:
  chosen = gold; rejected = the model's answer where it is wrong, else a random other label (so
  the DPO run's validation loss and reward accuracy cover right and wrong answers alike);
- ``test.jsonl``: the run's test split (the rows its bench scores, in order) as preference rows:
  chosen = gold, rejected = a random other label (bench scores the chosen answer only), so the DPO
  run benches on the SFT run's test rows, not on a held-out part of its own preference pairs.

``compare`` then runs recipes/smollm2-banking77-dpo.yaml from the SFT run on that set and benches its
PyTorch reference (base + adapter) on the rows the SFT run's own bench scored (its results.json,
PyTorch reference too; checked row by row). Writes benchmarks/results/dpo_banking77.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DPO_RECIPE = ROOT / "recipes" / "smollm2-banking77-dpo.yaml"


def answers(model_dir: Path, examples: list[Any], *, batch: int = 32, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of a merged model folder to each example's prompt (its chat template, its end-of-turn)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftedge.families import end_of_turn_id
    from ftedge.loader import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eot = end_of_turn_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch):
            texts = [tok.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True) for e in examples[i : i + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=pad)
            out += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


def build(sft_dir: Path, out: Path, *, train_rows: int, val_rows: int, seed: int = 0) -> dict[str, Any]:
    from ftedge import commands
    from ftedge.data import load_splits
    from ftedge.manifest import Run

    sft = Run.open(sft_dir)
    merged = commands.merge(sft.path)  # skipped when done
    splits = load_splits(sft.recipe())
    labels = splits.labels
    train, val = splits.train[:train_rows], splits.val[:val_rows]
    t0 = time.time()
    said_train, said_val = answers(merged, train), answers(merged, val)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    mistakes = [
        {"prompt": e.messages[-1]["content"], "chosen": e.target, "rejected": a}
        for e, a in zip(train, said_train, strict=True)
        if a and a != e.target
    ]
    val_pairs = []
    for e, a in zip(val, said_val, strict=True):
        wrong = bool(a) and a != e.target
        rejected = a if wrong else rng.choice([x for x in labels if x != e.target])
        val_pairs.append({"prompt": e.messages[-1]["content"], "chosen": e.target, "rejected": rejected, "model_was_wrong": wrong})
    test_pairs = [
        {"prompt": e.messages[-1]["content"], "chosen": e.target, "rejected": rng.choice([x for x in labels if x != e.target])}
        for e in splits.test
    ]
    for name, rows in (("train.jsonl", mistakes), ("val.jsonl", val_pairs), ("test.jsonl", test_pairs)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = {
        "sft_run": str(sft.path),
        "train_rows_scored": len(train),
        "train_accuracy_merged": round(sum(a == e.target for e, a in zip(train, said_train, strict=True)) / max(1, len(train)), 4),
        "preference_pairs": len(mistakes),
        "not_a_label": sum(1 for r in mistakes if r["rejected"] not in labels),
        "val_rows": len(val),
        "val_accuracy_merged": round(sum(a == e.target for e, a in zip(val, said_val, strict=True)) / max(1, len(val)), 4),
        "test_rows": len(test_pairs),
        "seconds": round(time.time() - t0, 1),
        "out": str(out),
    }
    (out / "build.json").write_text(json.dumps({**stats, "val_rows_asked": val_rows, "seed": seed}, indent=2) + "\n")
    print(json.dumps(stats), flush=True)
    return stats


def built_already(sft_dir: Path, out: Path, *, train_rows: int, val_rows: int, seed: int = 0) -> dict[str, Any] | None:
    """The stats of a preference set ``build`` already wrote from the same SFT run with the same settings, else None."""
    from ftedge.manifest import Run

    try:
        stats = json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return None
    same = (stats.get("sft_run"), stats.get("train_rows_scored"), stats.get("val_rows_asked"), stats.get("seed"))
    if same != (str(Run.open(sft_dir).path), train_rows, val_rows, seed):
        return None
    return {k: v for k, v in stats.items() if k not in ("val_rows_asked", "seed")}


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
    from ftedge.data import bench_examples, load_splits
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.targets import load_target

    prefs = args.out
    sft_ref = sft_accuracy(args.sft)
    n_eval = sft_ref["n"]  # the same held-out rows as the SFT run's bench
    settings = {"train_rows": args.train_rows, "val_rows": max(args.val_rows, n_eval)}
    built = None if args.rebuild else built_already(args.sft, prefs, **settings)
    if built is not None:
        print(f"reusing the preference set in {prefs} (built from the same run; --rebuild to answer again)", flush=True)
    else:
        built = build(args.sft, prefs, **settings)
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
    _same_rows(load_splits(Run.open(args.sft).recipe()).test[:n_eval], bench_examples(load_recipe(DPO_RECIPE, overrides))[:n_eval])
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
    parser.add_argument("--val-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60, help="compare: DPO steps")
    parser.add_argument("--rebuild", action="store_true", help="compare: answer the rows again even if --out holds a set built alike")
    parser.add_argument("--result", default="dpo_banking77.json", help="compare: file name under benchmarks/results/")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="compare: DPO recipe override")
    args = parser.parse_args()
    from ftedge.logs import setup_logging

    setup_logging(False)
    if args.command == "build":
        build(args.sft, args.out, train_rows=args.train_rows, val_rows=args.val_rows)
    else:
        compare(args)


if __name__ == "__main__":
    main()
