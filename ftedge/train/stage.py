"""The train stage: recipe -> trained adapter in the run folder.

``train_stage(run)`` resolves the base model, freezes the data's splits into the run
(``splits.json``, read back by every later stage), tokenizes them (``ftedge.data``), loads the
model per ``train.method`` (``ftedge.train.model``) and runs the loop (``ftedge.train.loop``):
eval every ``eval_every`` steps, resumable checkpoints in ``train/checkpoints/``,
``train/metrics.jsonl`` and TensorBoard events in ``train/``. The best-eval weights become
``adapter/`` (a PEFT adapter; a full HF model folder for ``method: full``), written
atomically and recorded in the manifest. A finished stage is skipped.

Speed on CPU (see benchmarks/train_throughput.py): bf16 autocast (AMX), padding-free packing
with per-example position ids, the LM head only on labelled positions, no LoRA dropout mask
when dropout is 0, and only the rows the steps will use are tokenized. Measured as CPU seconds
per step (SmolLM2-135M QLoRA r16, 16 BANKING77 rows = 888 tokens, 1 thread, process CPU time
because the machine was shared): full logits, dropout 0.05, one packed row 6.84 s; LM head on
labels only 5.86; dropout 0 5.19; rows of <= 256 tokens (attention cost) 4.69; NF4 weights
dequantized once instead of every call (same numbers) 3.84 = 1.8x overall. Then (issue 13, AMD EPYC
Zen 3, AVX2 only, fp32 since `auto` picks bf16 only where the CPU computes it natively, 1 thread,
process CPU time, machine shared): the micro-batch in one unpadded row with per-example attention
instead of rows of max_length 7.65 -> 6.33 s per 16 rows (fwd+bwd); fused AdamW ~4% of a step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from ftedge import atomic
from ftedge.manifest import Run

log = logging.getLogger(__name__)

EVAL_ROWS = 200  # validation rows scored at each evaluation (the first of the fixed split)


def _threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        import psutil

        torch.set_num_threads(max(1, psutil.cpu_count(logical=False) or torch.get_num_threads()))


DataWarnings = Callable[[Any, Any, Any], list[str]]  # (recipe, tokenizer, splits) -> one line per data finding


def train_stage(
    run: Run, *, resume: bool = False, eta_after: float | None = None, data_warnings: DataWarnings | None = None
) -> dict[str, Any]:
    """Train the run's recipe; returns the stage metrics.

    Everything after the skip check runs inside the stage (rank 0), so a failure before the first
    step (data, base model, tokenizer) is recorded as ``failed`` with its error. Training resumes from
    the last checkpoint with ``resume``; without one (a new run, or one that failed before its first
    checkpoint) ``train/`` is emptied first, so metrics and TensorBoard events start cleanly.
    ``eta_after`` (seconds the stages after training will take, from ``ftedge run``) adds a whole-run
    ETA to the progress bar. ``data_warnings`` (``ftedge data check``'s findings, handed in by ``ftedge.commands``: stages
    never import each other) are logged as warnings before the model loads.
    """
    adapter = run.artifact("adapter")
    if run.is_done("train") and adapter is not None and adapter.path.exists():
        log.info("train: already done in %s (skipped)", run.path)
        return run.stage_metrics("train")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not _cuda())
    main = accelerator.is_main_process  # under `accelerate launch`, only rank 0 touches the manifest
    with run.stage("train") if main else contextlib.nullcontext({}) as metrics:
        return _train(run, accelerator, metrics, resume=resume, eta_after=eta_after, data_warnings=data_warnings)


def _train(
    run: Run,
    accelerator: Any,
    metrics: dict[str, Any],
    *,
    resume: bool,
    eta_after: float | None = None,
    data_warnings: DataWarnings | None = None,
) -> dict[str, Any]:
    recipe = run.recipe()
    from ftedge.data.encoding import tokenized_splits
    from ftedge.data.splits import check_dataset

    check_dataset(recipe)  # cheap one-line errors before any model loads
    from ftedge.loader import compute_dtype, pick_device, training_tokenizer
    from ftedge.memory import peak_gpu_mb, peak_rss_mb
    from ftedge.train.loop import Trainer, fit, total_steps
    from ftedge.train.model import load_model

    main = accelerator.is_main_process
    out = run.path / "train"
    base = run.base_model()  # the recipe's base model, or train.init_from's merged model
    device = accelerator.device if accelerator.num_processes > 1 else pick_device()
    if device.type == "cpu":
        _threads()
    dtype = compute_dtype(recipe.quant.compute_dtype, device)
    cfg = recipe.train
    tokenizer = training_tokenizer(base, recipe.chat_template, trust_remote_code=recipe.trust_remote_code)
    splits = _splits(run, accelerator, resume=resume)
    if accelerator.is_main_process and data_warnings is not None:
        for line in data_warnings(recipe, tokenizer, splits):
            log.warning("data check: %s", line)
    steps = total_steps(cfg, len(splits.train), accelerator.num_processes)
    needed = steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    splits.train = splits.train[:needed]  # tokenize only what the steps will use
    splits.val = splits.val[:EVAL_ROWS]
    train_rows, val_rows = tokenized_splits(recipe, tokenizer, splits)

    import torch

    torch.manual_seed(cfg.seed)  # LoRA initialisation, then dropout: a run is reproducible
    model = load_model(recipe, base, device, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer_class = Trainer
    if cfg.objective == "dpo":
        from ftedge.train.dpo import PreferenceTrainer

        trainer_class = PreferenceTrainer
    trainer = trainer_class(model, cfg, train_rows, val_rows, out, dtype=dtype, pad_id=pad_id, accelerator=accelerator)
    found = trainer.checkpoints() if resume else []
    checkpoint = found[-1] if found else None
    if checkpoint is None:
        if resume:
            log.info("train: no checkpoint in %s: starting from step 0", out)
        if main and out.exists():
            shutil.rmtree(out)  # what a run that never reached a checkpoint left: metrics, events, a best adapter
    accelerator.wait_for_everyone()
    log.info(
        "train: %s%s on %s (%s), %d steps x %d examples, %d train / %d val rows, max_length %d",
        cfg.method if cfg.method == "full" else f"{cfg.method} ({recipe.adapter.method})",
        f", {cfg.objective} {cfg.dpo_settings}" if cfg.objective == "dpo" else "",
        device,
        str(dtype).removeprefix("torch."),
        trainer.steps,
        cfg.batch_size * cfg.grad_accum * trainer.world,
        len(train_rows),
        len(val_rows),
        cfg.max_length,
    )
    try:
        st = fit(trainer, resume_from=checkpoint, eta_after=eta_after)
    finally:
        metrics.update(_metrics(trainer.state, peak_rss_mb(), peak_gpu_mb()))
    if main:
        adapter = run.path / "adapter"
        with atomic.atomic_path(adapter) as tmp:
            if trainer.best_dir.is_dir():
                shutil.copytree(trainer.best_dir, tmp)
            else:  # no validation rows: keep the last weights
                from ftedge.train.loop import save_weights

                save_weights(model, tmp)
        fmt = "hf" if cfg.method == "full" else "peft"
        run.record_artifact(
            "adapter",
            adapter,
            stage="train",
            format=fmt,
            base_model=str(base),
            method=cfg.method,
            adapter_method=None if cfg.method == "full" else recipe.adapter.method,
            objective=cfg.objective,
            best_step=st.best_step,
            eval_loss=st.best_eval,
        )
        log.info(summary_line(metrics))
    accelerator.wait_for_everyone()
    return metrics


def _splits(run: Run, accelerator: Any, *, resume: bool) -> Any:
    """The run's splits: frozen into the run now (rank 0), or on ``--resume`` the ones frozen when it started (so a
    resumed run trains on the same rows, and refuses if its data file changed since)."""
    from ftedge.data.splits import SPLITS_ARTIFACT, freeze_splits, load_splits, run_splits

    if resume and run.artifact(SPLITS_ARTIFACT) is not None:
        return run_splits(run)
    if not accelerator.is_main_process:
        return load_splits(run.recipe())
    return freeze_splits(run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _metrics(st: Any, rss: float, gpu: float | None = None) -> dict[str, Any]:
    gpu_entry = {} if gpu is None else {"peak_gpu_mb": round(gpu, 1)}
    return {
        "steps": st.step,
        "examples": st.examples,
        "tokens": st.tokens,
        "trained_tokens": st.trained_tokens,
        "seconds": round(st.seconds, 2),
        "tokens_per_s": round(st.tokens / st.seconds, 1) if st.seconds else None,
        "peak_rss_mb": round(rss, 1),
        **gpu_entry,
        "final_loss": round(st.last_loss, 5) if st.last_loss is not None else None,
        "best_eval_loss": round(st.best_eval, 5) if st.best_eval is not None else None,
        "best_step": st.best_step,
        "stopped_early": st.stopped_early,
    }


def summary_line(m: dict[str, Any]) -> str:
    best = f"{m['best_eval_loss']:.4f} (step {m['best_step']})" if m.get("best_eval_loss") is not None else "n/a"
    return (
        f"train: {m['steps']} steps, {m['examples']} examples, {m['tokens']} tokens in {m['seconds']:.0f} s "
        f"({m['tokens_per_s'] or 0:.0f} tok/s), peak RSS {m['peak_rss_mb']:.0f} MB"
        + (f", peak GPU {m['peak_gpu_mb']:.0f} MB" if m.get("peak_gpu_mb") is not None else "")
        + f", best eval loss {best}"
        + (", stopped early" if m.get("stopped_early") else "")
    )
