"""The model being trained: base loading per method (QLoRA / LoRA / full) and the loss.

The loss runs the decoder body, then the LM head and cross-entropy only at the positions
that carry a label (the assistant's tokens). With a 49,152-token vocabulary the full-sequence
fp32 logits (and their gradient) are most of the activation memory and ~20% of the FLOPs of
a 135M model; on a chat-classification row only ~5 of ~50 positions are labelled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ftedge.data import IGNORE
from ftedge.errors import FtedgeError
from ftedge.hf import check_lora_targets, load_causal_lm
from ftedge.recipe import Recipe

log = logging.getLogger(__name__)


def load_model(recipe: Recipe, base: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Base model in the recipe's form, LoRA attached (unless full fine-tuning), in train mode."""
    method, q = recipe.train.method, recipe.quant
    trust = recipe.trust_remote_code
    if method == "qlora":
        model = load_causal_lm(base, dtype=dtype, four_bit=q, device=device, trust_remote_code=trust)
    elif method == "lora":
        model = load_causal_lm(base, dtype=dtype if q.bits == 16 else torch.float32, device=device, trust_remote_code=trust)
    else:  # full fine-tuning: fp32 master weights, compute under autocast
        model = load_causal_lm(base, dtype=torch.float32, device=device, trust_remote_code=trust)
    model.config.use_cache = False
    gc = recipe.train.gradient_checkpointing
    if method == "qlora" and device.type == "cpu":
        # bitsandbytes on CPU dequantizes every 4-bit weight to the compute dtype on every
        # forward and backward. Doing it once gives the same numbers (LoRA trains against the
        # NF4-rounded weights either way) and was ~18% faster per step on SmolLM2-135M; it
        # costs 2 bytes/parameter of RAM, which a CPU-sized model affords.
        model = model.dequantize(dtype=dtype)
        _float_outside_linear(model)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    check_lora_targets(model, lora.target_modules)  # one line naming modules the model lacks, before any step
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    return model


def _float_outside_linear(model: nn.Module) -> None:
    """Embeddings and norms in fp32 (as peft's prepare_model_for_kbit_training does): the
    residual stream stays fp32 and only the matmuls run in bf16 under autocast. A bf16
    residual stream trained measurably worse (eval loss +0.2 after 192 examples)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dtype != torch.float32:
                setattr(module, name, nn.Parameter(param.data.float(), requires_grad=param.requires_grad))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class LabelOnlyLoss(nn.Module):
    """``forward(batch) -> (summed token loss, trained-token count)``, LM head on labelled positions only.

    Wrapping the model in one module keeps DDP's gradient hooks intact.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        lm = causal_lm(model)
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.logit_scale = getattr(lm.config, "logit_scale", None)
        if self.decoder is None or self.head is None:
            raise FtedgeError(f"model type {lm.config.model_type} has no separate decoder and LM head", hint="use a standard causal LM")

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        label_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """``label_index``/``label_target`` (from :func:`label_positions`, computed on the host) pick the
        same positions as the labels mask does, without the device-to-host sync of boolean indexing."""
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        if label_index is None or label_target is None:
            target = labels[:, 1:]
            keep = target != IGNORE
            picked, target, n = out.last_hidden_state[:, :-1][keep], target[keep], keep.sum()
        else:
            picked, target, n = out.last_hidden_state.flatten(0, 1).index_select(0, label_index), label_target, label_index.numel()
        logits = self.head(picked).float()
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss = nn.functional.cross_entropy(logits, target, reduction="sum")
        return loss, n


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :class:`LabelOnlyLoss` scores a batch: the flat (row * width + column) index of every
    position whose next token carries a label, and those labels, in row-major order (the order
    of ``hidden[:, :-1][labels[:, 1:] != IGNORE]``)."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, labels[rows, cols + 1]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold of the weights: the trainable parameters."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise FtedgeError(
            f"checkpoint does not match the model (unknown weights {missing[:2]})", hint="resume with the same recipe, or start a new run"
        )
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
