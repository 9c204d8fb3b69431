"""The training loop: batches, optimizer steps, eval, checkpoints, resume, progress.

A short loop on accelerate (device placement, DDP under ``accelerate launch``, autocast,
backward) rather than ``transformers.Trainer`` / TRL ``SFTTrainer``, for reasons measured
or needed here: the loss computes the LM head only on labelled tokens (``train_model``),
batches are packed padding-free with per-example position ids, a step's loss is normalised
by the trained tokens of the whole global step (so DDP and grad accumulation give the same
update as one process), checkpoints are written atomically with everything an exact resume
needs (trainable weights, optimizer, scheduler, RNG, step = data position), and progress,
metrics.jsonl and TensorBoard come from one place.

On CUDA the step never waits on the GPU until its end: batches and the labelled positions are
built on the host and copied from pinned memory without blocking, token counts are host
integers, and the logged loss and gradient norm are read in one transfer after the optimizer
step. fp16 compute (GPUs before Ampere) adds a GradScaler, saved in the checkpoint. On the CPU
the copies are plain.

AdamW is fused (one kernel for every parameter) on CUDA and on the CPU: PyTorch's default on the
CPU is a Python loop of ~10 small ops per parameter tensor (420 LoRA tensors on SmolLM2-135M), ~70 ms
a step on one thread; the fused update gives the same losses to the 6th decimal and was ~4% faster
per step there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftedge import atomic
from ftedge.data.encoding import Encoded
from ftedge.errors import FtedgeError
from ftedge.recipe import TrainConfig
from ftedge.train.batch import make_batch
from ftedge.train.layers import LayerSchedule
from ftedge.train.model import LabelOnlyLoss, label_positions, load_trainable_state, packed_attention_index, trainable_state

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


@dataclass
class State:
    """What the loop carries between steps (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0  # non-padding tokens processed (all processes)
    trained_tokens: int = 0
    examples: int = 0
    seconds: float = 0.0  # training time, excluding model load
    best_eval: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    last_loss: float | None = None
    last_eval: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def total_steps(cfg: TrainConfig, n_train: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil(cfg.epochs * n_train / per_step))


def step_examples(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """Indices of the examples of global step ``step`` (0-based): a seeded shuffle per epoch."""
    out: list[int] = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + per_step - len(out)])
    return out


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, opt, num_warmup_steps=int(round(cfg.warmup_ratio * steps)), num_training_steps=steps)


class Interrupt:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to stop now)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupt]:
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """Runs the steps of one training stage; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_rows: list[Encoded],
        val_rows: list[Encoded],
        out_dir: Path,
        *,
        dtype: torch.dtype,
        pad_id: int,
        accelerator: Any,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.train_rows = train_rows
        self.val_rows = val_rows
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.best_dir = self.out / "best"
        self.pad_id = pad_id
        self.acc = accelerator
        self.dtype = dtype
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.steps = total_steps(cfg, len(train_rows), self.world)
        self.loss_module = self.make_loss(model)
        # A packed micro-batch in one row, no padding (packed attention keeps the examples apart).
        self.one_row = bool(cfg.packing and getattr(self.loss_module, "packed_attention", False))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = {k for k, p in model.named_parameters() if p.requires_grad}  # what checkpoints hold, frozen or not
        # -- layer schedule (train.unfreeze, train.layer_lr_decay; ftedge/train/layers.py) --
        self.layers = LayerSchedule(model, cfg) if cfg.unfreeze is not None or cfg.layer_lr_decay != 1.0 else None
        if self.layers is not None and cfg.unfreeze is not None and self.world > 1:
            raise FtedgeError("train.unfreeze runs on one process only", hint="train without accelerate launch, or drop train.unfreeze")
        groups = self.layers.param_groups() if self.layers is not None else self.params
        self.device = accelerator.device
        cuda = self.device.type == "cuda"
        # One fused kernel for the whole AdamW update (see the module docstring).
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        # fp16 compute (GPUs before Ampere) needs loss scaling: small gradients underflow in fp16.
        self.scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None
        self.last_grad_norm: float | None = None
        self.sched = make_scheduler(self.opt, cfg, self.steps)
        if self.world > 1:
            self.loss_module, self.opt = accelerator.prepare(self.loss_module, self.opt)
        self.state = State()

    # -- extension points (the DPO trainer, the layer schedule) ---------------
    def make_loss(self, model: nn.Module) -> nn.Module:
        """The module whose forward gives (summed loss, count) for a batch; wrapped by DDP."""
        return LabelOnlyLoss(model)

    def before_step(self, step: int) -> None:
        """Called before ``train_step(step)``: the layers that train at this step."""
        if self.layers is not None:
            self.layers.apply(step)

    def step_metrics(self) -> dict[str, Any]:
        """Extra figures for the step's metrics record (and TensorBoard)."""
        return self.layers.metrics() if self.layers is not None else {}

    def progress_info(self) -> str:
        """Extra text for the progress bar."""
        return ""

    # -- batches ------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[list[Encoded]]:
        cfg = self.cfg
        per_micro = cfg.batch_size * self.world
        idx = step_examples(step, len(self.train_rows), per_micro * cfg.grad_accum, cfg.seed)
        out = []
        for m in range(cfg.grad_accum):
            chunk = idx[m * per_micro : (m + 1) * per_micro]
            mine = chunk[self.rank * cfg.batch_size : (self.rank + 1) * cfg.batch_size]
            out.append([self.train_rows[i] for i in mine])
        return out

    def _tensors(self, rows: list[Encoded]) -> dict[str, Any]:
        """A micro-batch on the device, with its counts (host ints, read before the copy: no sync)."""
        one_row = self.one_row
        batch = make_batch(rows, max_length=self.cfg.max_length, packing=self.cfg.packing, pad_id=self.pad_id, one_row=one_row)
        n_tokens = batch.pop("n_tokens")
        batch["label_index"], batch["label_target"] = label_positions(batch["labels"])
        if one_row:
            batch["seq_gather"], batch["seq_scatter"] = packed_attention_index(batch["position_ids"])
        n_trained = int(batch["label_index"].numel())
        if self.device.type == "cuda":  # pinned host memory: the copies run asynchronously
            moved = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        else:
            moved = {k: v.to(self.device) for k, v in batch.items()}
        return moved | {"n_tokens": n_tokens, "n_trained": n_trained}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.acc.reduce(t, reduction="sum").item())

    # -- one step -----------------------------------------------------------
    # What differs between objectives (``train/dpo.py``): the micro-batch (``step_batch``), the units the
    # summed loss is divided by (``loss_units``: trained tokens here, pairs for DPO), the forward
    # (``forward_loss``: the summed loss and figures to keep), and what is made of those figures
    # (``after_batches``). The step itself (gradient accumulation, DDP, loss scaling, clipping,
    # the optimizer and schedule) is this one loop for every objective.
    LOSS_UNITS_ARE_TRAINED_TOKENS = True

    def step_batch(self, rows: list[Any]) -> dict[str, Any]:
        """A micro-batch on the device with ``n_tokens`` and ``n_trained`` (host ints)."""
        return self._tensors(rows)

    def loss_units(self, batch: dict[str, Any]) -> float:
        """What one micro-batch's summed loss counts: the loss of a step is the sum over all / these units."""
        return float(batch["n_trained"])

    def forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """The micro-batch's summed loss and what ``after_batches`` needs of it (nothing here)."""
        loss_sum, _ = self.loss_module(**batch)
        return loss_sum, None

    def after_batches(self, kept: list[Any], units: float, *, evaluating: bool) -> None:
        """Figures from the kept outputs of a step's (or the validation set's) micro-batches."""

    def train_step(self, step: int) -> float:
        """One optimizer step. The device is read once, at the end (the logged loss and gradient
        norm): token counts come from the host-side batches, so nothing waits inside the step."""
        micro = [self.step_batch(rows) for rows in self._micro_batches(step)]
        local_units = sum(self.loss_units(b) for b in micro)
        local_trained = sum(b.pop("n_trained") for b in micro)
        global_units = max(1.0, self._sum(float(local_units)))
        global_trained = global_units if self.LOSS_UNITS_ARE_TRAINED_TOKENS else self._sum(float(local_trained))
        sums: list[torch.Tensor] = []
        kept: list[Any] = []
        for i, b in enumerate(micro):
            n_tokens = b.pop("n_tokens")
            sync = contextlib.nullcontext() if (self.world == 1 or i == len(micro) - 1) else self.acc.no_sync(self.loss_module)
            with sync:
                with self._autocast():
                    loss_sum, keep = self.forward_loss(b)
                # DDP averages gradients over processes: scale so the result is sum / global units.
                loss = loss_sum * (self.world / global_units)
                if self.scaler is not None:
                    loss = self.scaler.scale(loss)
                if self.world > 1:
                    self.acc.backward(loss)
                else:
                    loss.backward()
            sums.append(loss_sum.detach().float())
            kept.append(keep)
            self.state.tokens += int(self._sum(float(n_tokens)))
        norm = None
        if self.cfg.max_grad_norm is not None:  # gradients are already averaged over processes here
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped (and the scale lowered) when a gradient overflowed
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        values = torch.stack(sums if norm is None else [*sums, norm.detach().float()]).tolist()  # the one sync
        if norm is not None:
            self.last_grad_norm = values.pop()
        total = 0.0
        for v in values:
            total += v
        self.state.trained_tokens += int(global_trained)
        self.state.examples += self.cfg.batch_size * self.cfg.grad_accum * self.world
        self.after_batches(kept, global_units, evaluating=False)
        return self._sum(total) / global_units

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val_rows:
            return None
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        count = 0.0
        kept: list[Any] = []
        rows = self.val_rows[self.rank :: self.world]
        bs = max(self.cfg.batch_size, 8)
        for i in range(0, len(rows), bs):
            b = self.step_batch(rows[i : i + bs])
            count += self.loss_units(b)
            b.pop("n_tokens")
            b.pop("n_trained")
            with self._autocast():
                s, keep = self.forward_loss(b)
            total += float(s)
            kept.append(keep)
        if was_training:
            self.model.train()
        units = max(1.0, self._sum(count))
        self.after_batches(kept, units, evaluating=True)
        return self._sum(total) / units

    # -- checkpoints --------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            self.acc.wait_for_everyone() if self.world > 1 else None
            return None
        from safetensors.torch import save_file

        path = self.ckpt_dir / f"step-{self.state.step:06d}"
        with atomic.atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            save_file(trainable_state(self.model, self.trainable), str(tmp / "trainable.safetensors"))
            optim = {"optimizer": self._unwrapped_opt().state_dict(), "scheduler": self.sched.state_dict()}
            if self.scaler is not None:
                optim["scaler"] = self.scaler.state_dict()
            torch.save(optim, tmp / "optim.pt")
            torch.save(
                {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                tmp / "rng.pt",
            )
            atomic.write_json(tmp / "state.json", {**self.state.__dict__, "steps": self.steps})
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            self.acc.wait_for_everyone()
        log.debug("checkpoint %s", path)
        return path

    def _unwrapped_opt(self) -> torch.optim.Optimizer:
        return getattr(self.opt, "optimizer", self.opt)

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        load_trainable_state(self.model, load_file(str(path / "trainable.safetensors")))
        optim = torch.load(path / "optim.pt", weights_only=True, map_location=self.device)
        self._unwrapped_opt().load_state_dict(optim["optimizer"])
        self.sched.load_state_dict(optim["scheduler"])
        if self.scaler is not None and "scaler" in optim:
            self.scaler.load_state_dict(optim["scaler"])
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = json.loads((path / "state.json").read_text())
        saved.pop("python_rng", None)  # written by ftedge <= 0.1.0; the data order never used it
        saved.pop("steps", None)
        self.state = State(**saved)
        log.info("resuming from %s (step %d of %d)", path.name, self.state.step, self.steps)

    def save_best(self) -> None:
        if self.rank != 0:
            return
        with atomic.atomic_path(self.best_dir) as tmp:
            save_weights(self.model, tmp)
            atomic.write_json(tmp / "ftedge-train.json", {"step": self.state.step, "eval_loss": self.state.best_eval})


def save_weights(model: nn.Module, folder: Path) -> None:
    """A PEFT adapter folder (LoRA) or a full HF model folder (full fine-tuning), safetensors."""
    target = getattr(model, "module", model)
    target.save_pretrained(str(folder), safe_serialization=True)


class Recorder:
    """metrics.jsonl + TensorBoard events (rank 0 only); a resume drops records past its step."""

    def __init__(self, out: Path, *, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb: Any = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic.write_text(self.path, "".join(f"{ln}\n" for ln in keep))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1), value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _progress(enabled: bool, whole_run: bool = False) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    run = [TextColumn("{task.fields[run_eta]}")] if whole_run else []
    return Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *run,
        disable=not enabled,
        transient=False,
    )


def run_eta(steps_left: int, wall_per_step: float | None, after: float) -> str:
    """The whole run's ETA during training: the steps left at the measured wall time per step (eval
    and checkpoints included) plus the stages after training."""
    from ftedge.eta import clock

    if wall_per_step is None:
        return "run ETA -:--:--"
    return f"run ETA {clock(steps_left * wall_per_step + after)}"


def fit(trainer: Trainer, *, resume_from: Path | None = None, eta_after: float | None = None) -> State:
    """Train to the last step (or early stop / Ctrl-C); returns the final state. ``eta_after`` (seconds
    of the stages after training) shows the whole run's ETA on the progress bar."""
    cfg = trainer.cfg
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    st = trainer.state
    main = trainer.rank == 0
    rec = Recorder(trainer.out, enabled=main, resume_step=st.step)
    interrupt = Interrupt()
    try:
        with interrupt.installed(), _progress(main, eta_after is not None) as bar:
            after = eta_after or 0.0
            task = bar.add_task("train", total=trainer.steps, completed=st.step, info="", run_eta=run_eta(trainer.steps, None, after))
            first_step, started = st.step, time.perf_counter()
            while st.step < trainer.steps and not st.stopped_early:
                t0 = time.perf_counter()
                tokens_before = st.tokens
                trainer.before_step(st.step)
                loss = trainer.train_step(st.step)
                dt = time.perf_counter() - t0
                st.seconds += dt
                st.step += 1
                st.last_loss = loss
                record: dict[str, Any] = {
                    "step": st.step,
                    "loss": round(loss, 6),
                    "lr": trainer.sched.get_last_lr()[0],
                    "tokens": st.tokens,
                    "tok_s": round((st.tokens - tokens_before) / dt, 1),
                    "step_s": round(dt, 3),
                }
                if trainer.last_grad_norm is not None:
                    record["grad_norm"] = round(trainer.last_grad_norm, 4)
                if st.step % cfg.eval_every == 0 or st.step == trainer.steps:
                    ev = trainer.evaluate()
                    if ev is not None:
                        st.last_eval = ev
                        record["eval_loss"] = round(ev, 6)
                        if st.best_eval is None or ev < st.best_eval - 1e-6:
                            st.best_eval, st.best_step, st.bad_evals = ev, st.step, 0
                            trainer.save_best()
                        else:
                            st.bad_evals += 1
                            patience = cfg.early_stopping_patience
                            if patience is not None and st.bad_evals >= patience:
                                st.stopped_early = True
                                log.info(
                                    "early stop at step %d: eval loss has not improved for %d evaluations (best %.4f at step %d)",
                                    st.step,
                                    st.bad_evals,
                                    st.best_eval,
                                    st.best_step,
                                )
                record.update(trainer.step_metrics())
                st.history.append({k: record[k] for k in ("step", "loss", "eval_loss") if k in record})
                rec.write(record)
                info = (
                    f"loss {loss:.4f}"
                    + (f" eval {st.last_eval:.4f}" if st.last_eval is not None else "")
                    + trainer.progress_info()
                    + f" {st.tokens / max(st.seconds, 1e-9):.0f} tok/s"
                )
                pace = (time.perf_counter() - started) / (st.step - first_step)
                bar.update(task, completed=st.step, info=info, run_eta=run_eta(trainer.steps - st.step, pace, after))
                if st.step % cfg.save_every == 0 or st.step == trainer.steps or st.stopped_early or interrupt.requested:
                    trainer.save_checkpoint()
                if interrupt.requested:
                    raise KeyboardInterrupt
    finally:
        rec.close()
    return st
