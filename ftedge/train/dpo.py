"""Preference tuning (``train.objective: dpo``): direct preference optimization on chosen/rejected pairs.

The loss of one pair (Rafailov et al., 2023, the sigmoid form TRL's ``DPOTrainer`` uses by default)::

    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with ``log p(answer)`` the sum of the answer tokens' log-probabilities (the end-of-turn token
included, as in SFT). The reference is the same model with the adapter disabled (peft's
``disable_adapter()``), evaluated without gradients: no second copy of the model is held, and
with QLoRA the reference is the 4-bit base the adapter trains on. Rows are packed exactly as in
SFT (``make_batch`` with per-example segments), and the LM head runs only on answer positions.

A step's loss is the mean over its pairs (all processes and micro-batches), so DDP and gradient
accumulation give the update of one process with the whole batch, as for SFT. Logged per step:
``reward_margin`` (mean of beta * the log-ratio difference), ``reward_accuracy`` (share of pairs
whose chosen answer gains more than the rejected one), ``reward_chosen`` / ``reward_rejected``;
at each evaluation the same on the validation pairs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ftedge.data import EncodedPair, make_batch
from ftedge.train.loop import Trainer
from ftedge.train.model import LabelOnlyLoss


class PreferenceLoss(nn.Module):
    """``forward(batch of [chosen0, rejected0, chosen1, ...]) -> (summed pair loss, chosen rewards, rejected rewards)``."""

    def __init__(self, model: nn.Module, beta: float) -> None:
        super().__init__()
        self.model = model
        self.beta = beta
        self.tokens = LabelOnlyLoss(model)

    def sequence_logps(self, batch: dict[str, torch.Tensor], n_rows: int, *, adapter: bool = True) -> torch.Tensor:
        """Summed log-probability of each row's trained tokens, shape (n_rows,)."""
        segments = batch["segments"]
        inputs = {k: v for k, v in batch.items() if k != "segments"}
        logits, target, keep = self.tokens.labelled_logits(**inputs, adapter=adapter)
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
        rows = segments[:, 1:][keep]
        return torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows = int(batch.pop("n_rows"))
        policy = self.sequence_logps(batch, n_rows)
        with torch.no_grad(), _adapter_disabled(self.model):
            ref = self.sequence_logps(batch, n_rows, adapter=False)
        chosen = self.beta * (policy[0::2] - ref[0::2])
        rejected = self.beta * (policy[1::2] - ref[1::2])
        loss = -nn.functional.logsigmoid(chosen - rejected)
        return loss.sum(), chosen.detach(), rejected.detach()


def _adapter_disabled(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    disable = getattr(model, "disable_adapter", None)
    if disable is None:  # the recipe validator allows DPO only with an adapter
        raise RuntimeError("DPO needs a PEFT adapter to disable for the reference")
    return disable()


class PreferenceTrainer(Trainer):
    """The loop's trainer with the DPO loss: rows are :class:`EncodedPair`, a step's unit is a pair."""

    train_rows: list[EncodedPair]  # type: ignore[assignment]
    val_rows: list[EncodedPair]  # type: ignore[assignment]

    def make_loss(self, model: nn.Module) -> nn.Module:
        self._last: dict[str, float] = {}
        self._eval: dict[str, float] = {}
        return PreferenceLoss(model, self.cfg.beta)

    def _pair_tensors(self, pairs: list[EncodedPair]) -> dict[str, Any]:
        rows = [r for pair in pairs for r in (pair.chosen, pair.rejected)]
        batch = make_batch(rows, max_length=self.cfg.max_length, packing=self.cfg.packing, pad_id=self.pad_id, segments=True)
        n_tokens = batch.pop("n_tokens")
        return {k: v.to(self.device) for k, v in batch.items()} | {"n_tokens": n_tokens, "n_rows": len(rows)}

    def train_step(self, step: int) -> float:
        micro = [self._pair_tensors(pairs) for pairs in self._micro_batches(step)]  # type: ignore[arg-type]
        global_pairs = self._sum(float(sum(b["n_rows"] // 2 for b in micro)))
        local_trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        chosen_all, rejected_all = [], []
        for i, b in enumerate(micro):
            n_tokens = b.pop("n_tokens")
            sync = contextlib.nullcontext() if (self.world == 1 or i == len(micro) - 1) else self.acc.no_sync(self.loss_module)
            with sync:
                with self._autocast():
                    loss_sum, chosen, rejected = self.loss_module(**b)
                loss = loss_sum * (self.world / global_pairs)  # DDP averages gradients over processes
                if self.world > 1:
                    self.acc.backward(loss)
                else:
                    loss.backward()
            total += float(loss_sum.detach())
            chosen_all.append(chosen.float())
            rejected_all.append(rejected.float())
            self.state.tokens += int(self._sum(float(n_tokens)))
        if self.cfg.max_grad_norm is not None:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.examples += self.cfg.batch_size * self.cfg.grad_accum * self.world
        self.state.trained_tokens += int(self._sum(float(local_trained)))
        self._last = self._reward_figures(torch.cat(chosen_all), torch.cat(rejected_all), global_pairs)
        return self._sum(total) / global_pairs

    def _reward_figures(self, chosen: torch.Tensor, rejected: torch.Tensor, n: float, prefix: str = "") -> dict[str, float]:
        margin = chosen - rejected
        sums = [float(margin.sum()), float((margin > 0).float().sum()), float(chosen.sum()), float(rejected.sum())]
        sums = [self._sum(x) for x in sums]
        return {
            f"{prefix}reward_margin": round(sums[0] / n, 5),
            f"{prefix}reward_accuracy": round(sums[1] / n, 4),
            f"{prefix}reward_chosen": round(sums[2] / n, 5),
            f"{prefix}reward_rejected": round(sums[3] / n, 5),
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val_rows:
            return None
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        chosen_all, rejected_all = [], []
        pairs = self.val_rows[self.rank :: self.world]
        bs = max(self.cfg.batch_size, 8)
        for i in range(0, len(pairs), bs):
            b = self._pair_tensors(pairs[i : i + bs])
            b.pop("n_tokens")
            with self._autocast():
                s, chosen, rejected = self.loss_module(**b)
            total += float(s)
            chosen_all.append(chosen.float())
            rejected_all.append(rejected.float())
        if was_training:
            self.model.train()
        n = max(1.0, self._sum(float(len(pairs))))
        empty = torch.zeros(0, device=self.device)
        chosen_t = torch.cat(chosen_all) if chosen_all else empty
        rejected_t = torch.cat(rejected_all) if rejected_all else empty
        self._eval = self._reward_figures(chosen_t, rejected_t, n, prefix="eval_")
        return self._sum(total) / n

    def step_metrics(self) -> dict[str, Any]:
        out = {**super().step_metrics(), **self._last, **self._eval}
        self._eval = {}
        return out

    def progress_info(self) -> str:
        if not self._last:
            return ""
        return f" margin {self._last['reward_margin']:.3f} acc {self._last['reward_accuracy']:.2f}"
