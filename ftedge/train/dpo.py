"""Preference tuning (``train.objective: dpo``): direct preference optimization on chosen/rejected pairs.

The loss of one pair (Rafailov et al., 2023, the sigmoid form TRL's ``DPOTrainer`` uses by default)::

    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with ``log p(answer)`` the sum of the answer tokens' log-probabilities (the end-of-turn token
included, as in SFT). ``train.sft_weight`` (w > 0) adds ``w`` x the chosen answers' mean token
cross-entropy over the micro-batch (RPO, Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]``
with ``loss_weights=[1, w]``, the same value): plain DPO can lower the chosen answers' likelihood too, as
long as the rejected ones fall faster. The reference is the same model with the adapter disabled (peft's
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

from ftedge.data.encoding import IGNORE, EncodedPair
from ftedge.train.batch import make_batch
from ftedge.train.loop import Trainer
from ftedge.train.model import LabelOnlyLoss


class PreferenceLoss(nn.Module):
    """``forward(batch of [chosen0, rejected0, chosen1, ...]) -> (summed pair loss, chosen rewards, rejected rewards)``."""

    def __init__(self, model: nn.Module, beta: float, sft_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.beta = beta
        self.sft_weight = sft_weight
        self.tokens = LabelOnlyLoss(model)

    def sequence_logps(self, batch: dict[str, torch.Tensor], n_rows: int, *, adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probability of each row's trained tokens and their number, each of shape (n_rows,)."""
        segments = batch["segments"]
        inputs = {k: v for k, v in batch.items() if k != "segments"}
        logits, target, keep = self.tokens.labelled_logits(**inputs, adapter=adapter)
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
        rows = segments[:, 1:][keep]
        zeros = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device)
        return zeros.index_add(0, rows, token_logps), zeros.index_add(0, rows, torch.ones_like(token_logps))

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows = int(batch.pop("n_rows"))
        policy, n_tokens = self.sequence_logps(batch, n_rows)
        with torch.no_grad(), _adapter_disabled(self.model):
            ref, _ = self.sequence_logps(batch, n_rows, adapter=False)
        chosen = self.beta * (policy[0::2] - ref[0::2])
        rejected = self.beta * (policy[1::2] - ref[1::2])
        loss = -nn.functional.logsigmoid(chosen - rejected).sum()
        if self.sft_weight:  # the chosen tokens' mean cross-entropy, counted once per pair (the step divides by pairs)
            loss = loss + self.sft_weight * (n_rows // 2) * (-policy[0::2].sum() / n_tokens[0::2].sum().clamp(min=1.0))
        return loss, chosen.detach(), rejected.detach()


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
        return PreferenceLoss(model, self.cfg.beta, self.cfg.sft_weight)

    LOSS_UNITS_ARE_TRAINED_TOKENS = False  # the DPO loss is a mean over pairs

    def step_batch(self, pairs: list[EncodedPair]) -> dict[str, Any]:  # type: ignore[override]
        rows = [r for pair in pairs for r in (pair.chosen, pair.rejected)]
        batch = make_batch(rows, max_length=self.cfg.max_length, packing=self.cfg.packing, pad_id=self.pad_id, segments=True)
        n_tokens = batch.pop("n_tokens")
        n_trained = int((batch["labels"][:, 1:] != IGNORE).sum())
        return {k: v.to(self.device) for k, v in batch.items()} | {"n_tokens": n_tokens, "n_trained": n_trained, "n_rows": len(rows)}

    def loss_units(self, batch: dict[str, Any]) -> float:
        return float(batch["n_rows"] // 2)

    def forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        loss_sum, chosen, rejected = self.loss_module(**batch)
        return loss_sum, (chosen.float(), rejected.float())

    def after_batches(self, kept: list[Any], units: float, *, evaluating: bool) -> None:
        empty = torch.zeros(0, device=self.device)
        chosen = torch.cat([c for c, _ in kept]) if kept else empty
        rejected = torch.cat([r for _, r in kept]) if kept else empty
        if evaluating:
            self._eval = self._reward_figures(chosen, rejected, units, prefix="eval_")
        else:
            self._last = self._reward_figures(chosen, rejected, units)

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

    def step_metrics(self) -> dict[str, Any]:
        out = {**super().step_metrics(), **self._last, **self._eval}
        self._eval = {}
        return out

    def progress_info(self) -> str:
        if not self._last:
            return ""
        return f" margin {self._last['reward_margin']:.3f} acc {self._last['reward_accuracy']:.2f}"
