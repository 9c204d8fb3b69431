"""Gradual unfreezing and layer-wise learning rates (``train.unfreeze``, ``train.layer_lr_decay``).

Every trainable weight is put in the decoder layer it belongs to (``...layers.<i>...``; LoRA,
DoRA and IA3 weights sit inside the layer they adapt). Weights outside the layers count as the
top (final norm, LM head) or as the bottom (embeddings, below layer 0).

- Unfreezing (ULMFiT's gradual unfreezing): at step s (0-based) the layers from
  ``n - 1 - s // every`` up train; the rest have ``requires_grad`` off, so they get no gradient
  and AdamW leaves them exactly as they are (no update, no weight decay). The schedule is a
  function of the step, so a resumed run freezes exactly what the uninterrupted one did.
- Layer-wise learning rates: layer i trains at ``lr * decay ** (n - 1 - i)`` (the top layer and
  the head at ``lr``, the embeddings at ``lr * decay ** n``), as AdamW parameter groups that the
  schedule scales together. With decay 1 there is one group, as without this module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ftedge.errors import FtedgeError
from ftedge.families import LAYER, causal_lm, layer_count
from ftedge.recipe import TrainConfig


def num_layers(model: nn.Module) -> int:
    return layer_count(causal_lm(model).config, "train.unfreeze / train.layer_lr_decay")


def layer_of(name: str, n: int) -> int:
    """The decoder layer of a parameter name; ``n`` above the layers (head, final norm), -1 below (embeddings)."""
    match = LAYER.search(name)
    if match:
        return int(match.group(1))
    return -1 if "embed" in name or ".wte." in name or ".wpe." in name else n


class LayerSchedule:
    """Which layers train at a step, and the optimizer's per-layer parameter groups."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.n = num_layers(model)
        self.every = cfg.unfreeze.every if cfg.unfreeze is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.by_layer: dict[int, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.by_layer.setdefault(layer_of(name, self.n), []).append(param)
        if not any(0 <= k < self.n for k in self.by_layer):
            raise FtedgeError(
                "train.unfreeze / train.layer_lr_decay: no trainable weight sits in a decoder layer",
                hint="use them with LoRA, DoRA, IA3 or full fine-tuning on a standard decoder",
            )
        self.lowest: int | None = None

    @property
    def active(self) -> bool:
        return self.every is not None or self.cfg.layer_lr_decay != 1.0

    def param_groups(self) -> list[Any]:
        """AdamW's parameters: one list in model order (no decay), else one group per layer from the top down with its learning rate."""
        decay = self.cfg.layer_lr_decay
        if decay == 1.0:
            return self.params
        groups = []
        for layer in sorted(self.by_layer, reverse=True):
            depth = max(0, self.n - 1 - layer)  # the head (n) trains with the top layer; embeddings (-1) at depth n
            groups.append({"params": self.by_layer[layer], "lr": self.cfg.lr * decay**depth})
        return groups

    def lowest_layer(self, step: int) -> int:
        """The lowest layer that trains at ``step`` (0-based); -1 once the embeddings train too."""
        if self.every is None:
            return -1
        return max(-1, self.n - 1 - step // self.every)

    def apply(self, step: int) -> None:
        """Turn gradients on for the layers that train at ``step`` and off for the others."""
        if self.every is None:
            return
        lowest = self.lowest_layer(step)
        if lowest == self.lowest:
            return
        for layer, params in self.by_layer.items():
            for p in params:
                p.requires_grad_(layer >= lowest)
        self.lowest = lowest

    def metrics(self) -> dict[str, Any]:
        """What the step's metrics record: the lowest training layer and how many decoder layers train."""
        if self.every is None or self.lowest is None:
            return {}
        return {"lowest_layer": self.lowest, "layers_trained": self.n - max(self.lowest, 0)}
