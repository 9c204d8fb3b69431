"""ftedge train vs the standard TRL recipe: useful tokens/s, peak memory, loss after N steps.

Same data (the default recipe's BANKING77 training rows, in the same order: TRL reads them
sequentially in the order ftedge's loop draws them), base model (default: the embedded
SmolLM2-135M-Instruct; ``--base`` takes any HF folder), NF4 QLoRA with the recipe's double
quant, LoRA settings, learning rate, schedule, batch size and number of steps. TRL runs
`SFTTrainer` + peft + bitsandbytes with its defaults otherwise (prompt/completion rows,
completion-only loss, gradient checkpointing on, no packing). Runs:

- ``ftedge``     the recipe as it is (gradient checkpointing off);
- ``ftedge-gc``  the same with ``train.gradient_checkpointing=true`` (TRL's memory setting);
- ``trl``        TRL ``SFTTrainer`` with its defaults;
- ``trl-tuned``  TRL as a careful user runs it: gradient checkpointing off and padding-free batches.

Every run computes in the recipe's dtype (``auto``: bf16 where the CPU or GPU computes it natively,
else fp32 on a CPU).

Model FLOPs utilisation (MFU) of each run = model FLOPs per useful token x useful tokens/s / the
GEMM rate of this machine. FLOPs per token are counted from the model config and the rows trained
(``model_flops``): the frozen base's linear layers forward and their input-gradient backward
(2 + 2 FLOPs per weight; no weight gradient), LoRA forward and backward (6 FLOPs per LoRA weight),
attention within each example (causal: QK and PV forward, twice that backward), and the LM head
forward and input-gradient backward on the labelled positions only. The GEMM rate is measured by
this benchmark (``gemm_rate``), in a process with the same thread count, in the dtype the runs
compute in, on the model's own linear shapes (forward and backward) at the tokens of one step.

Each run trains in its own process (peak RSS = that process's maximum; on CUDA also peak GPU
memory, ``torch.cuda.max_memory_allocated``, read when training ends), then scores its adapter
in the same process with the same code for every run: mean loss on the assistant tokens of
the first held-out rows, base NF4 + adapter. Useful tokens/s is given for the whole run and for
the steady state (steps after ``--warmup``; the ratios use the steady state).

    .venv/bin/python benchmarks/train_throughput.py --steps 15 --threads 2            # CPU
    python3 benchmarks/train_throughput.py --base /tmp/model --steps 100 --json out.json   # GPU

Writes the JSON (default benchmarks/results/train_throughput.json) and prints the ratios.
The TRL run needs the `bench` extra (trl, datasets). benchmarks/gpu_check.sh runs this on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftedge.memory import peak_gpu_mb, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-banking77.yaml"
EVAL_ROWS = 200
# TRL's defaults (linear decay, no warm-up, clip at 1.0) for ftedge too, so the loss comparison
# measures the trainers, not two schedules (the recipe's 5% warm-up costs 1 of 12 steps).
SAME_SCHEDULE = ["train.scheduler=linear", "train.warmup_ratio=0", "train.max_grad_norm=1.0"]
RUNS: dict[str, list[str]] = {"ftedge": [], "ftedge-gc": ["train.gradient_checkpointing=true"], "trl": [], "trl-tuned": []}
# padding-free without packing: TRL refuses a max_length it cannot enforce; the rows are short (<= the recipe's max_length)
TRL_TUNED = {"gradient_checkpointing": False, "padding_free": True, "max_length": None}


def _recipe(steps: int, batch: int, extra: list[str] | tuple[str, ...] = ()) -> Any:
    """The recipe frozen by the parent process (every run reads the same one)."""
    from ftedge.recipe import load_recipe

    return load_recipe(
        os.environ.get("FTEDGE_BENCH_RECIPE", RECIPE),
        [
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            f"train.eval_every={10**6}",
            f"train.save_every={10**6}",
            *SAME_SCHEDULE,
            *extra,
        ],
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _encoder(recipe: Any) -> Any:
    from ftedge.data.encoding import ChatEncoder
    from ftedge.loader import load_tokenizer, resolve_base_model

    return ChatEncoder(load_tokenizer(resolve_base_model(recipe.base_model)), recipe.train.max_length)


def _row_tokens(recipe: Any, rows: list[Any]) -> list[int]:
    """Useful tokens of each example as ftedge encodes it (the one measure for every run)."""
    enc = _encoder(recipe)
    return [len(e.input_ids) if e is not None else 0 for e in map(enc.encode, rows)]


def _ordered_rows(recipe: Any) -> list[Any]:
    """The training examples in the order ftedge's loop consumes them (one step after another)."""
    from ftedge.data.splits import load_splits
    from ftedge.train.loop import step_examples

    cfg = recipe.train
    per_step = cfg.batch_size * cfg.grad_accum
    rows = load_splits(recipe).train[: cfg.max_steps * per_step]  # what train_stage keeps
    return [rows[i] for s in range(cfg.max_steps) for i in step_examples(s, len(rows), per_step, cfg.seed)]


def _free() -> None:
    """Give the GPU memory of a finished model back before the next one loads (CUDA only)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def worker_ftedge(steps: int, batch: int, warmup: int, out: Path, extra: list[str]) -> dict:
    from ftedge.manifest import Run
    from ftedge.train import train_stage

    recipe = _recipe(steps, batch, extra)
    run = Run.create(recipe, run_dir=out / "run")
    m = train_stage(run)
    result = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}
    records = [json.loads(line) for line in (run.path / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if r["step"] > warmup]
    before = next((r["tokens"] for r in records if r["step"] == warmup), 0)
    result |= {
        "adapter": str(run.path / "adapter"),
        "train_seconds": m["seconds"],
        "tokens": m["tokens"],
        "examples": m["examples"],
        "steps": m["steps"],
        "steady_seconds": sum(r["step_s"] for r in steady) if steady else None,
        "steady_tokens": (records[-1]["tokens"] - before) if steady else None,
        "last_train_loss": records[-1]["loss"] if records else None,
    }
    return result


def worker_trl(steps: int, batch: int, warmup: int, out: Path, extra: list[str], tuned: dict | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ftedge.loader import compute_dtype, pick_device, resolve_base_model

    recipe = _recipe(steps, batch, extra)
    base = resolve_base_model(recipe.base_model)
    rows = _ordered_rows(recipe)
    ds = Dataset.from_list([{"prompt": e.messages, "completion": [{"role": "assistant", "content": e.target}]} for e in rows])
    q, cuda = recipe.quant, _cuda()
    dtype = compute_dtype(q.compute_dtype, pick_device())
    model = AutoModelForCausalLM.from_pretrained(
        str(base),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype
        ),
        dtype=dtype,
        device_map={"": torch.cuda.current_device()} if cuda else "cpu",
    )
    lora = recipe.lora
    args = SFTConfig(
        output_dir=str(out / "trl"),
        use_cpu=not cuda,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=recipe.train.lr,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        seed=recipe.train.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,  # no progress bar (as for ftedge in a log file)
        **(tuned or {}),
    )
    clock: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, steps):
                _sync()
                clock[state.global_step] = time.perf_counter()

    class InOrder(SFTTrainer):
        """Reads the rows in the order given (ftedge's order), not a fresh shuffle."""

        def _get_train_sampler(self, dataset: Any = None, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(dataset if dataset is not None else self.train_dataset)

    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(str(base)),
        peft_config=LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
        ),
        callbacks=[StepClock()],
    )
    _sync()
    t = time.perf_counter()
    result = trainer.train()
    _sync()
    seconds = time.perf_counter() - t
    peaks = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}
    trainer.model.save_pretrained(str(out / "trl-adapter"))
    tokens = _row_tokens(recipe, rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steady = warmup in clock and steps in clock and warmup < steps
    del trainer, model
    return peaks | {
        "adapter": str(out / "trl-adapter"),
        "train_seconds": seconds,
        "tokens": sum(tokens),
        "examples": len(rows),
        "steps": steps,
        "steady_seconds": clock[steps] - clock[warmup] if steady else None,
        "steady_tokens": sum(tokens[warmup * batch :]) if steady else None,
        "last_train_loss": losses[-1] if losses else None,
        "trl_runtime": result.metrics.get("train_runtime"),
    }


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer of a Llama-family config."""
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    return {
        "q_proj": (h, heads * d),
        "k_proj": (h, kv * d),
        "v_proj": (h, kv * d),
        "o_proj": (heads * d, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _config(recipe: Any) -> Any:
    from transformers import AutoConfig

    from ftedge.loader import resolve_base_model

    return AutoConfig.from_pretrained(str(resolve_base_model(recipe.base_model)))


def model_flops(config: Any, lora_r: int, lora_targets: str | list[str], examples: list[tuple[int, int]]) -> dict:
    """Model FLOPs of training on ``examples`` ((tokens, labelled positions) each) with a frozen base and
    LoRA (see the module docstring); returns the total per useful token and its parts."""
    shapes = linear_shapes(config)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    targets = shapes if lora_targets == "all-linear" else {k: v for k, v in shapes.items() if k in lora_targets}
    tokens = sum(n for n, _ in examples)
    labelled = sum(k for _, k in examples)
    base = 4 * layers * sum(i * o for i, o in shapes.values())  # forward 2 + input gradient 2 per weight
    lora = 6 * layers * lora_r * sum(i + o for i, o in targets.values())  # forward, input and weight gradients
    # causal attention inside each example: QK and PV are 4*d FLOPs per (query, key) pair and head
    # forward, twice that backward; an example of n tokens has n(n+1)/2 pairs
    pairs = sum(n * (n + 1) // 2 for n, _ in examples)
    attention = 12 * d * heads * layers * pairs / tokens
    head = 4 * config.hidden_size * config.vocab_size * labelled / tokens  # forward + input gradient
    parts = {"base_linear": base, "lora": lora, "attention": attention, "lm_head": head}
    return {"per_token": sum(parts.values()), **{k: round(v) for k, v in parts.items()}, "tokens": tokens, "labelled": labelled}


def gemm_rate(config: Any, tokens: int, dtype_name: str, seconds: float = 0.4, rounds: int = 3) -> float:
    """GFLOP/s of this process's GEMMs on the model's linear shapes at ``tokens`` rows: each layer's
    forward ([tokens, in] x [in, out]) and input-gradient ([tokens, out] x [out, in]) products, FLOPs
    over time of the whole mix, best of ``rounds`` (the rate the machine reaches, not its noise)."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if _cuda() else "cpu"
    mats = []
    for i, o in linear_shapes(config).values():
        w = torch.randn(o, i, dtype=dtype, device=device)
        mats.append((torch.randn(tokens, i, dtype=dtype, device=device), w))  # forward
        mats.append((torch.randn(tokens, o, dtype=dtype, device=device), w.t().contiguous()))  # input gradient
    flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[0] for x, w in mats)
    for x, w in mats:  # warm-up
        torch.nn.functional.linear(x, w)
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            for x, w in mats:
                torch.nn.functional.linear(x, w)
            n += 1
            _sync()
            if time.perf_counter() - t0 >= seconds:
                break
        best = max(best, n * flops / (time.perf_counter() - t0) / 1e9)
    return best


def eval_loss(adapter: str, steps: int, batch: int, rows: int = EVAL_ROWS) -> float:
    """Mean assistant-token loss of base (NF4) + adapter on the first held-out rows (same code for every run)."""
    import torch
    from peft import PeftModel

    from ftedge.data.splits import load_splits
    from ftedge.loader import compute_dtype, load_causal_lm, pick_device, resolve_base_model
    from ftedge.train.batch import make_batch
    from ftedge.train.model import LabelOnlyLoss

    recipe = _recipe(steps, batch)
    base = resolve_base_model(recipe.base_model)
    device = pick_device()
    dtype = compute_dtype(recipe.quant.compute_dtype, device)
    model = load_causal_lm(base, dtype=dtype, four_bit=recipe.quant, device=device)
    model = PeftModel.from_pretrained(model, adapter).eval()
    enc = _encoder(recipe)
    encoded = [e for e in map(enc.encode, load_splits(recipe).val[:rows]) if e is not None]
    loss_fn = LabelOnlyLoss(model)
    total = count = 0.0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for i in range(0, len(encoded), 16):
            b = make_batch(encoded[i : i + 16], max_length=recipe.train.max_length, packing=True)
            b.pop("n_tokens")
            s, n = loss_fn(**{k: v.to(device) for k, v in b.items()})
            total += float(s)
            count += float(n)
    del model, loss_fn
    _free()
    return total / count


def run_one(kind: str, steps: int, batch: int, warmup: int, out: Path, eval_rows: int) -> dict:
    """Train one run (ftedge, ftedge-gc or trl) and score its adapter; the worker's whole job."""
    out.mkdir(parents=True, exist_ok=True)
    if kind == "trl-tuned":
        r = worker_trl(steps, batch, warmup, out, RUNS[kind], tuned=TRL_TUNED)
    else:
        r = (worker_trl if kind == "trl" else worker_ftedge)(steps, batch, warmup, out, RUNS[kind])
    _free()
    r["eval_loss"] = eval_loss(r.pop("adapter"), steps, batch, eval_rows)
    r["useful_tok_s"] = r["tokens"] / r["train_seconds"]
    r["steady_tok_s"] = r["steady_tokens"] / r["steady_seconds"] if r.get("steady_seconds") else None
    return r


def _env(args: argparse.Namespace, out: Path) -> dict:
    env = {
        **os.environ,
        "FTEDGE_BENCH_RECIPE": str(out / "recipe.yaml"),
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _spawn(kind: str, args: argparse.Namespace, out: Path) -> dict:
    env = _env(args, out)
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--warmup", str(args.warmup), "--eval-rows", str(args.eval_rows), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / kind / "result.json").read_text())


def _ratio(a: dict, b: dict) -> dict:
    def rate(r: dict) -> float:
        return r["steady_tok_s"] or r["useful_tok_s"]

    out = {
        "throughput": rate(a) / rate(b),
        "eval_loss_delta": a["eval_loss"] - b["eval_loss"],
        "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
    }
    if a.get("peak_gpu_mb") and b.get("peak_gpu_mb"):
        out["peak_gpu"] = a["peak_gpu_mb"] / b["peak_gpu_mb"]
    return out


def environment() -> dict:
    """Versions and hardware the figures were measured on."""
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    info["cpu_count"] = os.cpu_count()
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def benchmark(args: argparse.Namespace) -> dict:
    """Every run of ``args.runs`` on one base model; returns the JSON document, also written to
    ``args.json`` after each run (a run cut short by a time limit keeps the ones before it)."""
    from ftedge.recipe import dump_recipe, load_recipe

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}: choose from {', '.join(RUNS)}")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ftedge-bench-") as tmp:
        out = Path(tmp)
        overrides = ([f"base_model={args.base}"] if args.base else []) + list(args.set)
        (out / "recipe.yaml").write_text(dump_recipe(load_recipe(args.recipe, overrides)))
        os.environ["FTEDGE_BENCH_RECIPE"] = str(out / "recipe.yaml")
        mfu = mfu_basis(args, out)
        print(
            f"model FLOPs {mfu['flops']['per_token'] / 1e6:.0f} M per useful token; GEMM rate {mfu['gemm_gflops']:.1f} GFLOP/s "
            f"({mfu['dtype']}, {args.threads} threads, {mfu['step_tokens']} tokens)",
            flush=True,
        )
        for kind in runs:
            if kind.startswith("trl") and not _importable("trl", "datasets"):
                skipped[kind] = "trl or datasets is not installed (the `bench` extra)"
                print(f"{kind:9s} skipped: {skipped[kind]}", flush=True)
                continue
            if args.in_process:  # the CPU dry run of gpu_check: same functions, no process start-up cost
                os.environ["FTEDGE_BENCH_RECIPE"] = str(out / "recipe.yaml")
                r = run_one(kind, args.steps, args.batch, args.warmup, out / kind, args.eval_rows)
            else:
                try:
                    r = _spawn(kind, args, out)
                except subprocess.CalledProcessError as err:  # one trainer failing must not lose the others
                    skipped[kind] = f"failed (exit {err.returncode}; its output is above)"
                    print(f"{kind:9s} {skipped[kind]}", flush=True)
                    _write(args.json, _document(args, runs, results, skipped, mfu))
                    continue
            results[kind] = r
            gpu = f"  peak GPU {r['peak_gpu_mb']:7.0f} MB" if r.get("peak_gpu_mb") else ""
            steady = f" (steady {r['steady_tok_s']:.1f})" if r.get("steady_tok_s") else ""
            print(
                f"{kind:9s} {r['useful_tok_s']:9.1f} useful tok/s{steady}  peak RSS {r['peak_rss_mb']:6.0f} MB{gpu}  "
                f"eval loss {r['eval_loss']:.4f}  ({r['examples']} examples, {r['train_seconds']:.1f} s)",
                flush=True,
            )
            _write(args.json, _document(args, runs, results, skipped, mfu))
    doc = _document(args, runs, results, skipped, mfu)
    for name, x in doc["ratio"].items():
        gpu = f", {x['peak_gpu']:.2f}x peak GPU memory" if "peak_gpu" in x else ""
        rss, loss = x["peak_rss"], x["eval_loss_delta"]
        label = name.replace("/trl-tuned", " / tuned TRL").replace("/trl", " / TRL")
        print(f"{label}: {x['throughput']:.2f}x throughput{gpu}, {rss:.2f}x peak RSS, eval loss {loss:+.4f}")
    for kind, r in doc["results"].items():
        print(f"MFU {kind}: {100 * r['mfu']:.1f}%")
    return doc


def mfu_basis(args: argparse.Namespace, out: Path) -> dict:
    """FLOPs per useful token of the rows the runs train on, and the GEMM rate (own process, same threads)."""
    import torch

    from ftedge.loader import compute_dtype, pick_device

    recipe = _recipe(args.steps, args.batch)
    enc = _encoder(recipe)
    examples = [(len(e.input_ids), e.n_trained) for e in map(enc.encode, _ordered_rows(recipe)) if e is not None]
    config = _config(recipe)
    flops = model_flops(config, recipe.lora.r, recipe.lora.target_modules, examples)
    device = pick_device() if args.device != "cpu" else torch.device("cpu")
    dtype = str(compute_dtype(recipe.quant.compute_dtype, device)).removeprefix("torch.")
    step_tokens = round(flops["tokens"] / args.steps)
    if args.in_process:
        gflops = gemm_rate(config, step_tokens, dtype)
    else:
        cmd = [sys.executable, __file__, "--worker", "gemm", "--steps", str(step_tokens), "--gemm-dtype", dtype, "--out", str(out)]
        subprocess.run(cmd, check=True, env=_env(args, out))
        gflops = json.loads((out / "gemm.json").read_text())["gflops"]
    return {"flops": flops, "gemm_gflops": gflops, "dtype": dtype, "step_tokens": step_tokens, "threads": args.threads}


def _document(args: argparse.Namespace, runs: list[str], results: dict, skipped: dict, mfu: dict | None = None) -> dict:
    ratios = {
        f"{k}/{b}": _ratio(r, results[b])
        for b in ("trl", "trl-tuned")
        if b in results
        for k, r in results.items()
        if k.startswith("ftedge")
    }
    if mfu:
        for r in results.values():
            r["mfu"] = (r["steady_tok_s"] or r["useful_tok_s"]) * mfu["flops"]["per_token"] / (mfu["gemm_gflops"] * 1e9)
    recipe = Path(args.recipe).resolve()
    return {
        "mfu_basis": mfu,
        "steps": args.steps,
        "batch": args.batch,
        "warmup": args.warmup,
        "threads": args.threads,
        "device": "cuda" if _cuda() and args.device != "cpu" else "cpu",
        "base": args.base or "recipe",
        "environment": environment(),
        "load_avg_at_end": os.getloadavg(),
        "results": results,
        "skipped": skipped,
        "ratio": ratios,
        "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
        "overrides": SAME_SCHEDULE + list(args.set),
        "runs": {k: RUNS[k] for k in runs},
    }


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _importable(*names: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(n) is not None for n in names)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state rate")
    ap.add_argument("--runs", default="ftedge,trl", help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--base", help="base model folder (default: the recipe's base_model)")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto = CUDA when present")
    ap.add_argument("--eval-rows", type=int, default=EVAL_ROWS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run (repeatable)")
    ap.add_argument("--in-process", action="store_true", help="run every trainer in this process (dry runs only: peaks are shared)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    ap.add_argument("--worker", choices=[*RUNS, "gemm"], help=argparse.SUPPRESS)
    ap.add_argument("--gemm-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        if args.worker == "gemm":  # --steps carries the tokens of one step
            config = _config(_recipe(1, args.batch))
            (args.out / "gemm.json").write_text(json.dumps({"gflops": gemm_rate(config, args.steps, args.gemm_dtype)}))
            return None
        r = run_one(args.worker, args.steps, args.batch, args.warmup, args.out / args.worker, args.eval_rows)
        (args.out / args.worker / "result.json").write_text(json.dumps(r))
        return None
    doc = benchmark(args)
    _write(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
