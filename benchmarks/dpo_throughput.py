"""ftedge DPO vs TRL's DPOTrainer: useful tokens/s and peak RSS on the same preference pairs.

Same pairs (BANKING77 training rows: chosen = the gold label, rejected = another label drawn with a
fixed seed), base model (embedded SmolLM2-135M-Instruct, NF4 QLoRA, bf16 compute), LoRA settings,
beta, learning rate, batch size (pairs per step) and number of steps. Both start from the base
model (no SFT run needed: this measures the trainers), the reference being the base with the
adapter disabled on both sides. TRL runs with its defaults otherwise (padded rows, gradient
checkpointing on). Each side trains in its own process; useful tokens are the tokens of the
chosen and rejected rows (prompt + answer), counted once by the same code.

    .venv/bin/python benchmarks/dpo_throughput.py --steps 10 --threads 2
    .venv/bin/python benchmarks/dpo_throughput.py --steps 4 --batch 8 --threads 1 --fp32   # AVX2-only CPUs

Writes benchmarks/results/dpo_throughput.json. Needs the `bench` extra (trl, datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftedge.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "smollm2-banking77.yaml"
DPO_RECIPE = ROOT / "recipes" / "smollm2-banking77-dpo.yaml"


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    from ftedge.data.splits import load_splits
    from ftedge.recipe import load_recipe

    splits = load_splits(load_recipe(SFT_RECIPE))
    rng = random.Random(seed)
    rows = [
        {"prompt": e.messages[-1]["content"], "chosen": e.target, "rejected": rng.choice([x for x in splits.labels if x != e.target])}
        for e in splits.train[:n]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(out: Path, steps: int, batch: int):
    from ftedge.recipe import load_recipe

    return load_recipe(
        DPO_RECIPE,
        [
            f"quant.compute_dtype={os.environ.get('FTEDGE_BENCH_DTYPE', 'bfloat16')}",
            f"data.train={out / 'pairs.jsonl'}",
            "data.val=null",
            "data.val_fraction=0",
            "train.init_from=null",
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            f"train.eval_every={10**6}",
            f"train.save_every={10**6}",
            "train.scheduler=linear",
            "train.warmup_ratio=0",
        ],
    )


def _useful_tokens(recipe) -> int:
    from ftedge.data.encoding import tokenized_splits
    from ftedge.data.splits import load_splits
    from ftedge.loader import load_tokenizer, resolve_base_model

    pairs, _ = tokenized_splits(recipe, load_tokenizer(resolve_base_model(recipe.base_model)), load_splits(recipe))
    n = recipe.train.max_steps * recipe.train.batch_size
    return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs[:n])


def worker_ftedge(out: Path, steps: int, batch: int) -> dict:
    from ftedge.manifest import Run
    from ftedge.train import train_stage

    run = Run.create(_recipe(out, steps, batch), run_dir=out / "ftedge-run")
    m = train_stage(run)
    return {"train_seconds": m["seconds"], "examples": m["examples"], "peak_rss_mb": peak_rss_mb(), "final_loss": m["final_loss"]}


def worker_trl(out: Path, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from ftedge.data.splits import load_splits
    from ftedge.loader import load_tokenizer, resolve_base_model

    recipe = _recipe(out, steps, batch)
    base = resolve_base_model(recipe.base_model)
    rows = load_splits(recipe).train[: steps * batch]
    ds = Dataset.from_list(
        [
            {
                "prompt": e.messages,
                "chosen": [{"role": "assistant", "content": e.target}],
                "rejected": [{"role": "assistant", "content": e.rejected}],
            }
            for e in rows
        ]
    )
    q, a = recipe.quant, recipe.adapter
    model = AutoModelForCausalLM.from_pretrained(
        str(base),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        ),
        device_map="cpu",
    )
    args = DPOConfig(
        bf16=q.compute_dtype == "bfloat16",
        output_dir=str(out / "trl"),
        use_cpu=True,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=recipe.train.lr,
        beta=recipe.train.beta,
        max_length=recipe.train.max_length,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        seed=recipe.train.seed,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=load_tokenizer(base),
        peft_config=LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules, task_type="CAUSAL_LM"),
    )
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    return {"train_seconds": seconds, "examples": len(rows), "peak_rss_mb": peak_rss_mb(), "final_loss": result.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["ftedge", "trl"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "dpo_throughput.json")
    ap.add_argument(
        "--fp32", action="store_true", help="compute in float32 on both sides (CPUs without AVX512-BF16/AMX: bf16 matmuls are slow)"
    )
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        fn = worker_ftedge if args.worker == "ftedge" else worker_trl
        (args.out / f"{args.worker}.json").write_text(json.dumps(fn(args.out, args.steps, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="ftedge-dpo-bench-") as tmp:
        out = Path(tmp)
        write_pairs(out / "pairs.jsonl", args.steps * args.batch)
        tokens = _useful_tokens(_recipe(out, args.steps, args.batch))
        results = {}
        load = [round(os.getloadavg()[0], 2)]
        for kind in ("ftedge", "trl"):
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
            env["FTEDGE_BENCH_DTYPE"] = "float32" if args.fp32 else "bfloat16"
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out)]
            subprocess.run(cmd, check=True, env=env)
            r = json.loads((out / f"{kind}.json").read_text())
            r["useful_tok_s"] = tokens / r["train_seconds"]
            results[kind] = r
            load.append(round(os.getloadavg()[0], 2))
            print(
                f"{kind:7s} {r['useful_tok_s']:7.1f} useful tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  final loss {r['final_loss']:.4f}  "
                f"({r['examples']} pairs, {r['train_seconds']:.0f} s)",
                flush=True,
            )
    f, t = results["ftedge"], results["trl"]
    ratio = {"throughput": f["useful_tok_s"] / t["useful_tok_s"], "peak_rss": f["peak_rss_mb"] / t["peak_rss_mb"]}
    print(f"ftedge / TRL: {ratio['throughput']:.2f}x throughput, {ratio['peak_rss']:.2f}x peak RSS")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch": args.batch,
                "threads": args.threads,
                "compute_dtype": "float32" if args.fp32 else "bfloat16",
                "useful_tokens": tokens,
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_avg_1m": load,
                "results": results,
                "ratio": ratio,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
