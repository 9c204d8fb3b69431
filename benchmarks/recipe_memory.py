"""Peak memory and step time of `ftedge train` for each shipped chat recipe's base model, on CPU.

No download: each base is a random model of the real architecture and shape (the public
config.json values below: hidden size, layers, heads, vocabulary, intermediate size, tied
embeddings), saved in bf16 safetensors with SmolLM2's tokenizer (ChatML). The recipe itself is
trained unchanged (QLoRA NF4, r16 all-linear, batch 8 x grad_accum 2, max_length 1024, packing,
gradient checkpointing) except for the data (synthetic support chats, ~120 tokens each, so a
micro-batch of 8 packs into one row of ~1,000 tokens, as real chat data does), a few steps, and
no evaluation or checkpoint inside them. Each run is one `ftedge train` process; its peak RSS
(VmHWM) and seconds per optimizer step come from the run's manifest.

    .venv/bin/python benchmarks/recipe_memory.py                    # all four recipes
    .venv/bin/python benchmarks/recipe_memory.py --only qwen2.5-0.5b-instruct-chat --steps 2

Writes benchmarks/results/recipe_memory.json (merged with earlier results of other recipes), with
the machine's load average before and after each run: timings taken while other work runs are loose.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "recipe_memory.json"

# Public config.json values of the hub models the recipes name.
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b-instruct-chat": dict(
        config="Qwen2Config",
        hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
    ),
    "llama-3.2-1b-instruct-chat": dict(
        config="LlamaConfig",
        hub_id="meta-llama/Llama-3.2-1B-Instruct",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    ),
    "smollm2-360m-instruct-chat": dict(
        config="LlamaConfig",
        hub_id="HuggingFaceTB/SmolLM2-360M-Instruct",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    ),
    "smollm2-1.7b-instruct-chat": dict(
        config="LlamaConfig",
        hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    ),
}

WORDS = (
    "order refund password account delivery invoice card payment subscription plan upgrade cancel address email "
    "phone support ticket shipping return exchange discount coupon balance transfer limit login security update"
).split()


def build_base(name: str, out: Path, tokenizer_dir: Path) -> int:
    """A random bf16 model of the recipe's base shape in ``out``; returns its parameter count."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = {k: v for k, v in SHAPES[name].items() if k not in ("config", "hub_id")}
    config = getattr(transformers, SHAPES[name]["config"])(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    del model
    gc.collect()
    return n


def smollm2_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    from ftedge.basemodel import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def chat_rows(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Synthetic support chats (user ~45 words, assistant ~45 words: ~120 tokens with the template)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(35, 55))) + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(35, 55))) + "."
            fh.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n")
    return path


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(name: str, steps: int, work: Path, tokenizer_dir: Path, data: Path) -> dict:
    base = work / f"{name}-random"
    t0 = time.time()
    params = build_base(name, base, tokenizer_dir)
    build_s = time.time() - t0
    run_dir = work / f"{name}-run"
    recipe = ROOT / "recipes" / f"{name}.yaml"
    overrides = [
        f"base_model={base}",
        f"data.train={data}",
        f"train.max_steps={steps}",
        "train.eval_every=100000",
        "train.save_every=100000",
        "data.val_fraction=0.05",
    ]
    cmd = [sys.executable, "-m", "ftedge.cli", "train", str(recipe), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["-o", o]
    load_before = load_average()
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: ftedge train failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = manifest["stages"]["train"]["metrics"]
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "base_model": SHAPES[name]["hub_id"],
        "architecture": SHAPES[name]["architectures"][0],
        "parameters": params,
        "method": "qlora nf4, r16 all-linear, batch 8 x grad_accum 2, max_length 1024, packing, gradient checkpointing",
        "steps": metrics["steps"],
        "tokens": metrics["tokens"],
        "peak_rss_mb": metrics["peak_rss_mb"],
        "train_seconds": metrics["seconds"],
        "seconds_per_step": round(metrics["seconds"] / max(metrics["steps"], 1), 1),
        "process_wall_seconds": round(wall, 1),
        "build_random_base_seconds": round(build_s, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(SHAPES), help="recipe(s) to measure (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per recipe")
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results.setdefault("recipes", {})
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["note"] = "random weights of each hub model's real shape; CPU only; see benchmarks/recipe_memory.py"
    with tempfile.TemporaryDirectory(prefix="recipe-memory-") as tmp:
        work = Path(tmp)
        tokenizer_dir = smollm2_tokenizer(work / "tokenizer")
        data = chat_rows(work / "chats.jsonl")
        for name in args.only or list(SHAPES):
            print(f"{name}: building a random {SHAPES[name]['hub_id']} and training {args.steps} steps ...", flush=True)
            entry = measure(name, args.steps, work, tokenizer_dir, data)
            results["recipes"][name] = entry
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
            print(
                f"  peak RSS {entry['peak_rss_mb']:.0f} MB, {entry['seconds_per_step']} s/step "
                f"({entry['tokens']} tokens in {entry['steps']} steps), load {entry['load_average_before']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
