"""The model being trained: base loading per method (QLoRA / LoRA / full), the adapter per
``adapter.method`` (peft's LoRA, DoRA, IA3, prefix tuning), and the loss.

The loss runs the decoder body, then the LM head and cross-entropy only at the positions
that carry a label (the assistant's tokens). With a 49,152-token vocabulary the full-sequence
fp32 logits (and their gradient) are most of the activation memory and ~20% of the FLOPs of
a 135M model; on a chat-classification row only ~5 of ~50 positions are labelled.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftedge.data.encoding import IGNORE
from ftedge.errors import FtedgeError
from ftedge.families import causal_lm, check_lora_targets, layer_count, layer_linear_names, prefix_tokens, tied_embeddings
from ftedge.loader import dequantize_4bit, load_causal_lm
from ftedge.recipe import Recipe

log = logging.getLogger(__name__)


def load_model(recipe: Recipe, base: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Base model in the recipe's form, the adapter attached (unless full fine-tuning), in train mode."""
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
        # forward and backward: doing it once gives the same numbers (LoRA trains against the
        # NF4-rounded weights either way), faster, for RAM a CPU-sized model affords.
        model = dequantize_4bit(model, dtype)
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
    if recipe.train.packing and device.type == "cpu" and recipe.adapter.method != "prefix":  # prefix: keys longer than the row
        enable_packed_attention(model, dtype, recipe.train.max_length)
    if method == "full":
        model.train()
        return model
    from peft import get_peft_model

    if recipe.adapter.method in ("lora", "dora"):
        check_lora_targets(model, recipe.adapter.target_modules)  # one line naming modules the model lacks, before any step
    model = get_peft_model(model, peft_config(recipe, model))
    model.train()
    return model


def peft_config(recipe: Recipe, model: nn.Module) -> object:
    """peft's config for ``adapter.method``: LoRA, DoRA (LoRA with ``use_dora``), IA3 or prefix tuning."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    a = recipe.adapter
    model_config = model.config
    if a.method in ("lora", "dora"):
        targets, layers = a.target_modules, None
        if a.top_layers is not None:  # peft takes layers_to_transform with a list of names only
            n = layer_count(model_config, "adapter.top_layers")
            layers = list(range(max(0, n - a.top_layers), n))
            targets = layer_linear_names(model) if targets == "all-linear" else targets
        return LoraConfig(
            r=a.r,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            use_dora=a.method == "dora",
            task_type="CAUSAL_LM",
        )
    if a.method == "ia3":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

        model_type = getattr(model_config, "model_type", "")
        if a.target_modules == "all-linear":  # peft's per-architecture IA3 default (k, v, down for Llama)
            if model_type not in TARGETS:
                raise FtedgeError(
                    f"adapter.method=ia3: peft has no default IA3 modules for model type {model_type!r}",
                    hint="set adapter.target_modules to the key/value and MLP output projections, e.g. [k_proj, v_proj, down_proj]",
                )
            return IA3Config(task_type="CAUSAL_LM")
        targets = list(a.target_modules) if isinstance(a.target_modules, list) else [a.target_modules]
        ff = FEEDFORWARD.get(model_type, [])
        return IA3Config(target_modules=targets, feedforward_modules=[m for m in targets if m in ff], task_type="CAUSAL_LM")
    if a.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type="CAUSAL_LM")
    raise FtedgeError(f"unknown adapter.method {a.method!r}", hint="use lora, dora, ia3 or prefix")


# ----------------------------------------------------------------------------- packed attention
PACKED_ATTENTION = "ftedge_packed_sdpa"


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    seq_gather: torch.Tensor | None = None,
    seq_scatter: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per example of a batch laid in one row (``make_batch(one_row=True)``).

    transformers' attention functions take ``(batch, heads, length, head_dim)``; here batch is 1 and
    the row holds every example end to end. ``seq_gather`` (examples x longest, from
    :func:`packed_attention_index`) lays the tokens out one example per row, right-padded with
    copies of the example's own tokens; SDPA runs causal with no mask (the flash kernel skips the
    blocks above the diagonal), so a real query only sees its own example's earlier keys; the
    padding's outputs are dropped by ``seq_scatter`` and get no gradient. Against rows of
    ``max_length`` with a block-diagonal mask this computes no padding in the linear layers (~12%
    of the positions on BANKING77) and less attention. The mask transformers builds (as for SDPA)
    is not needed then; without the indices (any other batch) it is transformers' SDPA with it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if seq_gather is None or seq_scatter is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n, width = seq_gather.shape
    window = kwargs.pop("sliding_window", None)
    if query.shape[0] != 1 or (window and window < width) or kwargs.get("softcap"):
        raise ValueError("packed attention takes one packed row, no softcap, no sliding window shorter than an example")
    flat = seq_gather.flatten()

    def unpack(x: torch.Tensor) -> torch.Tensor:  # (1, H, N, D) -> (examples, H, width, D)
        heads, dim = x.shape[1], x.shape[3]
        return x[0].transpose(0, 1).index_select(0, flat).view(n, width, heads, dim).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, unpack(query), unpack(key), unpack(value), None, dropout=dropout, scaling=scaling, **kwargs)
    # out: (examples, width, H, D) -> the packed row (1, N, H, D)
    return out.reshape(n * width, *out.shape[2:]).index_select(0, seq_scatter).unsqueeze(0), None


def packed_attention_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices :func:`packed_attention` needs for one packed row (position ids restarting at 0 per
    example): ``gather`` (examples x longest example: each example's token positions in the row,
    the tail padded with its last one) and ``scatter`` (for each token of the row, its place in the
    flattened per-example layout). Built on the host, with the batch."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([pos.numel()]))
    width = int(lengths.max())
    offsets = torch.minimum(torch.arange(width)[None, :], lengths[:, None] - 1)
    gather = starts[:, None] + offsets
    example = torch.repeat_interleave(torch.arange(len(starts)), lengths)
    return gather, example * width + pos


def enable_packed_attention(model: nn.Module, dtype: torch.dtype, max_length: int) -> bool:
    """Switch the model's attention to :func:`packed_attention` when it takes transformers' attention
    functions, and check on two short random examples that one packed row gives the same hidden
    states as each example alone; otherwise leave it as it was. True when on."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    lm = causal_lm(model)
    can = getattr(lm, "_can_set_attn_implementation", None)
    config = lm.config
    window = getattr(config, "sliding_window", None)
    if not callable(can) or not can() or getattr(config, "attn_logit_softcapping", None) or (window and window < max_length):
        return False
    before = config._attn_implementation
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # batches without the indices: SDPA's masks
    lm.set_attn_implementation(PACKED_ATTENTION)
    decoder = lm.get_decoder()
    device = next(lm.parameters()).device
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, config.vocab_size, (1, n), generator=gen) for n in (3, 5))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    gather, scatter = packed_attention_index(position_ids)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        row = decoder(
            input_ids=torch.cat([a, b], 1).to(device),
            position_ids=position_ids.to(device),
            seq_gather=gather.to(device),
            seq_scatter=scatter.to(device),
            use_cache=False,
        ).last_hidden_state
        alone = decoder(input_ids=b.to(device), use_cache=False).last_hidden_state
        rows = decoder(input_ids=torch.cat([a, b], 1).to(device), position_ids=position_ids.to(device), use_cache=False).last_hidden_state
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    atol = tol * float(alone.abs().max())
    same = all(torch.allclose(x[0, 3:].float(), alone[0].float(), atol=atol, rtol=0) for x in (row, rows))
    if not same:
        log.warning("packed attention does not match per-example attention on %s: keeping %s", config.model_type, before)
        lm.set_attn_implementation(before)
    return same


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
    if tied_embeddings(model.config):
        model.tie_weights()


class LabelOnlyLoss(nn.Module):
    """``forward(batch) -> (summed token loss, trained-token count)``, LM head on labelled positions only.

    Wrapping the model in one module keeps DDP's gradient hooks intact. A prefix-tuning adapter
    is applied as peft's own forward does: its key/value prefix as the decoder's cache, the
    attention mask extended over it (so prefix tuning needs unpacked rows).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_prefix = prefix_tokens(model)
        lm = causal_lm(model)
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.logit_scale = getattr(lm.config, "logit_scale", None)
        self.packed_attention = getattr(lm.config, "_attn_implementation", None) == PACKED_ATTENTION
        if self.decoder is None or self.head is None:
            raise FtedgeError(f"model type {lm.config.model_type} has no separate decoder and LM head", hint="use a standard causal LM")

    def labelled_logits(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        label_target: torch.Tensor | None = None,
        *,
        adapter: bool = True,
        seq_gather: torch.Tensor | None = None,
        seq_scatter: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """fp32 logits at the labelled positions, their target tokens, and the (B, L-1) mask of those positions.

        ``label_index``/``label_target`` (from :func:`label_positions`, computed on the host) pick the same
        positions as the labels mask does, without the device-to-host sync of boolean indexing (no mask is
        returned then)."""
        extra: dict[str, object] = {}
        if self.n_prefix and adapter:
            batch = input_ids.shape[0]
            extra["past_key_values"] = self.model.get_prompt(batch, max_cache_len=input_ids.shape[1] + self.n_prefix)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.n_prefix), attention_mask], dim=1)
            if position_ids is not None:
                position_ids = position_ids + self.n_prefix
        if seq_gather is not None:  # a batch in one row (packed attention)
            extra |= {"seq_gather": seq_gather, "seq_scatter": seq_scatter}
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra)
        keep: torch.Tensor | None = None
        if label_index is None or label_target is None:
            target = labels[:, 1:]
            keep = target != IGNORE
            picked, target = out.last_hidden_state[:, :-1][keep], target[keep]
        else:
            picked, target = out.last_hidden_state.flatten(0, 1).index_select(0, label_index), label_target
        logits = self.head(picked).float()
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits, target, keep

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        label_target: torch.Tensor | None = None,
        seq_gather: torch.Tensor | None = None,
        seq_scatter: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """``label_index``/``label_target`` (from :func:`label_positions`, computed on the host) pick the
        same positions as the labels mask does, without the device-to-host sync of boolean indexing.
        ``seq_gather``/``seq_scatter`` (from :func:`packed_attention_index`) go with a batch in one row."""
        logits, target, keep = self.labelled_logits(
            input_ids, labels, position_ids, attention_mask, label_index, label_target, seq_gather=seq_gather, seq_scatter=seq_scatter
        )
        loss = nn.functional.cross_entropy(logits, target, reduction="sum")
        return loss, keep.sum() if keep is not None else target.numel()


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :class:`LabelOnlyLoss` scores a batch: the flat (row * width + column) index of every
    position whose next token carries a label, and those labels, in row-major order (the order
    of ``hidden[:, :-1][labels[:, 1:] != IGNORE]``)."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, labels[rows, cols + 1]


def trainable_state(model: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold of the weights: the trainable parameters (``names``: those, even while frozen)."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if (k in names if names is not None else v.requires_grad)}


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
