"""ftedge train vs the standard TRL recipe: useful tokens/s, peak RSS, eval loss.

Same data (the default recipe's BANKING77 training rows, in the same order), base model
(embedded SmolLM2-135M-Instruct, NF4 QLoRA, bf16 compute), LoRA settings, learning rate,
batch size and number of examples. TRL runs `SFTTrainer` + peft + bitsandbytes with its
defaults otherwise (prompt/completion rows, completion-only loss, gradient checkpointing on,
no packing). Each side trains in its own process (peak RSS = that process's maximum), then
both adapters are scored by the same code: mean loss on the assistant tokens of the first
200 held-out rows, base NF4 + adapter.

    .venv/bin/python benchmarks/train_throughput.py --steps 15 --threads 2

Writes benchmarks/results/train_throughput.json and prints the ratios. Needs the `bench`
extra (trl, datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftedge.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-banking77.yaml"
EVAL_ROWS = 200
# TRL's defaults (linear decay, no warm-up, clip at 1.0) for ftedge too, so the eval-loss
# comparison measures the trainers, not two schedules (the recipe's 5% warm-up costs 1 of 12 steps).
SAME_SCHEDULE = ["train.scheduler=linear", "train.warmup_ratio=0", "train.max_grad_norm=1.0"]


def _recipe(steps: int, batch: int):
    """The recipe frozen by the parent process (both sides read the same one)."""
    from ftedge.recipe import load_recipe

    return load_recipe(
        os.environ.get("FTEDGE_BENCH_RECIPE", RECIPE),
        [f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.eval_every={10**6}", f"train.save_every={10**6}", *SAME_SCHEDULE],
    )


def _useful_tokens(recipe, rows) -> int:
    from ftedge.data import ChatEncoder
    from ftedge.hf import load_tokenizer, resolve_base_model

    enc = ChatEncoder(load_tokenizer(resolve_base_model(recipe.base_model)), recipe.train.max_length)
    return sum(len(e.input_ids) for e in map(enc.encode, rows) if e is not None)


def worker_ftedge(steps: int, batch: int, out: Path) -> dict:
    from ftedge.manifest import Run
    from ftedge.train import train_stage

    recipe = _recipe(steps, batch)
    run = Run.create(recipe, run_dir=out / "ftedge-run")
    m = train_stage(run)
    return {
        "adapter": str(run.path / "adapter"),
        "train_seconds": m["seconds"],
        "tokens": m["tokens"],
        "examples": m["examples"],
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_trl(steps: int, batch: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from ftedge.data import load_splits
    from ftedge.hf import resolve_base_model

    recipe = _recipe(steps, batch)
    base = resolve_base_model(recipe.base_model)
    rows = load_splits(recipe).train[: steps * batch]
    ds = Dataset.from_list([{"prompt": e.messages, "completion": [{"role": "assistant", "content": e.target}]} for e in rows])
    q = recipe.quant
    model = AutoModelForCausalLM.from_pretrained(
        str(base),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=torch.bfloat16
        ),
        device_map="cpu",
    )
    lora = recipe.lora
    args = SFTConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=recipe.train.lr,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        seed=recipe.train.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(str(base)),
        peft_config=LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
        ),
    )
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    rss = peak_rss_mb()
    trainer.model.save_pretrained(str(out / "trl-adapter"))
    return {
        "adapter": str(out / "trl-adapter"),
        "train_seconds": seconds,
        "tokens": _useful_tokens(recipe, rows),
        "examples": len(rows),
        "peak_rss_mb": rss,
        "trl_runtime": result.metrics.get("train_runtime"),
    }


def eval_loss(adapter: str, steps: int, batch: int) -> float:
    """Mean assistant-token loss of base (NF4) + adapter on the first held-out rows (same code for both)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftedge.data import ChatEncoder, load_splits, make_batch
    from ftedge.hf import load_tokenizer, resolve_base_model
    from ftedge.train.model import LabelOnlyLoss

    recipe = _recipe(steps, batch)
    base = resolve_base_model(recipe.base_model)
    model = AutoModelForCausalLM.from_pretrained(
        str(base),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        ),
        device_map="cpu",
    )
    model = PeftModel.from_pretrained(model, adapter).eval()
    enc = ChatEncoder(load_tokenizer(base), recipe.train.max_length)
    rows = [e for e in map(enc.encode, load_splits(recipe).val[:EVAL_ROWS]) if e is not None]
    loss_fn = LabelOnlyLoss(model)
    total = count = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(rows), 16):
            b = make_batch(rows[i : i + 16], max_length=recipe.train.max_length, packing=True)
            b.pop("n_tokens")
            s, n = loss_fn(**b)
            total += float(s)
            count += float(n)
    return total / count


def _spawn(kind: str, steps: int, batch: int, threads: int, out: Path) -> dict:
    env = {
        **os.environ,
        "FTEDGE_BENCH_RECIPE": str(out / "recipe.yaml"),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    res = out / f"{kind}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--batch", str(batch), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(res.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["ftedge", "trl", "eval"])
    ap.add_argument("--adapter")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        if args.worker == "eval":
            result = {"eval_loss": eval_loss(args.adapter, args.steps, args.batch)}
            (args.out / f"eval-{Path(args.adapter).name}.json").write_text(json.dumps(result))
            return
        fn = worker_ftedge if args.worker == "ftedge" else worker_trl
        (args.out / f"{args.worker}.json").write_text(json.dumps(fn(args.steps, args.batch, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix="ftedge-bench-") as tmp:
        out = Path(tmp)
        from ftedge.recipe import dump_recipe, load_recipe

        (out / "recipe.yaml").write_text(dump_recipe(load_recipe(RECIPE)))
        results = {}
        for kind in ("ftedge", "trl"):
            r = _spawn(kind, args.steps, args.batch, args.threads, out)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "FTEDGE_BENCH_RECIPE": str(out / "recipe.yaml")}
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "eval",
                    "--adapter",
                    r["adapter"],
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--out",
                    str(out),
                ],
                check=True,
                env=env,
            )
            r["eval_loss"] = json.loads((out / f"eval-{Path(r['adapter']).name}.json").read_text())["eval_loss"]
            r["useful_tok_s"] = r["tokens"] / r["train_seconds"]
            r.pop("adapter")
            results[kind] = r
            print(
                f"{kind:7s} {r['useful_tok_s']:7.1f} useful tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  eval loss {r['eval_loss']:.4f}  "
                f"({r['examples']} examples, {r['train_seconds']:.0f} s)",
                flush=True,
            )
    f, t = results["ftedge"], results["trl"]
    ratio = {
        "throughput": f["useful_tok_s"] / t["useful_tok_s"],
        "peak_rss": f["peak_rss_mb"] / t["peak_rss_mb"],
        "eval_loss_delta": f["eval_loss"] - t["eval_loss"],
    }
    print(
        f"ftedge / TRL: {ratio['throughput']:.2f}x throughput, {ratio['peak_rss']:.2f}x peak RSS, eval loss {ratio['eval_loss_delta']:+.4f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch": args.batch,
                "threads": args.threads,
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_avg_at_end": os.getloadavg(),
                "results": results,
                "ratio": ratio,
                "recipe": str(RECIPE.relative_to(ROOT)),
                "overrides": SAME_SCHEDULE,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
