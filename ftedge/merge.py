"""Merge the LoRA adapter into a float copy of the base: ``run/merged`` (safetensors + tokenizer).

Two modes, both measured against the model that was actually trained (base + adapter; the
4-bit NF4 base for QLoRA) by top-1 next-token agreement and KL on validation prompts:

* ``dequantized`` (default): load the base in 4-bit NF4 exactly as training did, dequantize it
  (``model.dequantize()``) to float, then merge. The adapter learned to correct the NF4 weights,
  not the original float ones, so this keeps what was learned. Measured on SmolLM2-135M with
  one QLoRA adapter (150 unseen BANKING77 rows): base(NF4)+adapter 0.49 accuracy, merged into
  the dequantized base 0.51, merged into the float base 0.39 -- the naive merge costs ~11 points.
* ``float``: merge into the original float base (the right choice for plain LoRA, which
  trained on the float base; with ``quant.bits`` 16/32 both modes are this one).

Weights are never merged into 4-bit tensors. Both modes' drift figures go into the stage's
metrics in the manifest; the written model is the recipe's ``export.merge_into`` unless
``into`` overrides it.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

from ftedge.atomic import atomic_path
from ftedge.errors import FtedgeError, check_free_space
from ftedge.families import end_of_turn_id
from ftedge.formats.quants import BYTES_PER_WEIGHT
from ftedge.manifest import Run
from ftedge.recipe import require_mergeable

log = logging.getLogger(__name__)

MODES = ("dequantized", "float")
N_PROMPTS = 16


def check_adapter(adapter: Path) -> dict[str, Any]:
    """The PEFT adapter folder must hold a readable config and safetensors weights."""
    cfg_path = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    hint = f"the adapter is incomplete or damaged: delete {adapter} and run `ftedge train --resume {adapter.parent}`"
    if not cfg_path.is_file():
        raise FtedgeError(f"adapter {adapter} has no adapter_config.json", hint=hint)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FtedgeError(f"adapter config {cfg_path} cannot be read ({err})", hint=hint) from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise FtedgeError(f"{cfg_path} is not a PEFT adapter config (no peft_type)", hint=hint)
    if not weights.is_file():
        raise FtedgeError(f"adapter {adapter} has no adapter_model.safetensors", hint=hint)
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            keys = list(fh.keys())
            for k in keys:
                fh.get_slice(k)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise FtedgeError(f"adapter weights {weights} are damaged ({type(err).__name__}: {err})", hint=hint) from None
    if not keys:
        raise FtedgeError(f"adapter weights {weights} hold no tensors", hint=hint)
    return cfg


def _load_base(base: Path, *, four_bit: bool, quant: Any, trust_remote_code: bool, device: Any = None) -> Any:
    """The base as training loaded it: 4-bit with the recipe's compute dtype (QLoRA), else float32;
    on ``device`` (default: the GPU when there is one, else the CPU)."""
    import torch

    from ftedge.loader import compute_dtype, load_causal_lm, pick_device

    device = device or pick_device()
    if four_bit:
        dtype = compute_dtype(quant.compute_dtype, device)
        return load_causal_lm(base, dtype=dtype, four_bit=quant, device=device, trust_remote_code=trust_remote_code)
    return load_causal_lm(base, dtype=torch.float32, device=device, trust_remote_code=trust_remote_code)


def _with_adapter(model: Any, adapter: Path) -> Any:
    from ftedge.loader import attach_adapter

    try:
        return attach_adapter(model, adapter)
    except Exception as err:  # shape mismatch, wrong base, damaged file
        raise FtedgeError(
            f"adapter {adapter} does not fit base model ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})",
            hint=f"the adapter was trained on another base model; train a new run: `ftedge train {adapter.parent / 'recipe.yaml'}`",
        ) from None


def build_merged(base: Path, adapter: Path, mode: str, *, quant: Any, trust_remote_code: bool = False, device: Any = None) -> Any:
    """A float32 model with the adapter merged in (``mode``: dequantized or float), built on ``device``."""
    import torch

    if mode not in MODES:
        raise FtedgeError(f"unknown merge mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    if mode == "dequantized":
        model = _load_base(base, four_bit=True, quant=quant, trust_remote_code=trust_remote_code, device=device)
        from ftedge.loader import dequantize_4bit

        model = dequantize_4bit(model).to(torch.float32)
    else:
        model = _load_base(base, four_bit=False, quant=quant, trust_remote_code=trust_remote_code, device=device)
    model = _with_adapter(model, adapter).merge_and_unload()
    model.config.dtype = torch.float32
    return model.eval()


def _reference_model(base: Path, adapter: Path, *, four_bit: bool, quant: Any, trust_remote_code: bool) -> Any:
    """What was trained: the base (4-bit when QLoRA) with the adapter on top, unmerged. On CPU the 4-bit weights are
    dequantized once into the compute dtype, as CPU training holds them (bitsandbytes' own CPU kernels compute
    differently on AVX-512 BF16 CPUs: the merge test's top-1 agreement fell to 0.87 on a tiny random model)."""
    model = _load_base(base, four_bit=four_bit, quant=quant, trust_remote_code=trust_remote_code)
    if four_bit and model.device.type == "cpu":
        from ftedge.loader import compute_dtype, dequantize_4bit

        model = dequantize_4bit(model, compute_dtype(quant.compute_dtype, model.device))
    return _with_adapter(model, adapter).eval()


def _logits(model: Any, ids: list[list[int]], start: int) -> list[Any]:
    """Log-probs of each row from ``start`` on, the rows run in padded batches (``ftedge.backends.torch.batched_logits``)."""
    from ftedge.backends.torch import batched_logits
    from ftedge.logits import log_softmax

    return [log_softmax(lg) for lg in batched_logits(model, ids, start=start)]


def _save(model: Any, tokenizer: Any, base: Path, out: Path, tokenizer_source: Path | None = None) -> None:
    """Weights, the tokenizer files of ``tokenizer_source`` as they are (a transformers re-save drops
    ``tokenizer.model`` and ``added_tokens_decoder``, which llama.cpp's converter reads) with the trained
    chat template, and a generation config ending on the end-of-turn token."""
    from transformers import GenerationConfig

    from ftedge.formats.chat_template import write_chat_template
    from ftedge.loader import copy_tokenizer_files

    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_source is None or not copy_tokenizer_files(tokenizer_source, out):
        tokenizer.save_pretrained(out)
    if tokenizer.chat_template:
        write_chat_template(out, tokenizer.chat_template)
    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = GenerationConfig()
    eot = end_of_turn_id(tokenizer)
    eos = tokenizer.eos_token_id
    if eot is not None:
        gen.eos_token_id = eot if eos in (None, eot) else [eot, eos]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    gen.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise FtedgeError(f"merged weights were not written to {out}")


def _tokenizer_source(base: Path, adapter: Path) -> Path:
    return adapter if (adapter / "tokenizer_config.json").is_file() else base


def _tokenizer(base: Path, adapter: Path, trust_remote_code: bool, chat_template: str | None = None) -> Any:
    """The tokenizer the model was trained with (``ftedge.loader.training_tokenizer``: the trained chat template)."""
    from ftedge.loader import training_tokenizer

    return training_tokenizer(_tokenizer_source(base, adapter), chat_template, trust_remote_code=trust_remote_code)


def measure_drift(
    base: Path,
    adapter: Path,
    modes: list[str],
    texts: list[str],
    *,
    quant: Any,
    four_bit: bool,
    tokenizer: Any,
    trust_remote_code: bool = False,
    keep: str | None = None,
) -> tuple[dict[str, dict[str, float]], Any]:
    """Top-1 agreement and KL of each merge mode against base+adapter on ``texts``; returns the ``keep`` model too."""
    from ftedge.logits import compare_logits, scored_from

    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    start = scored_from(ids)
    ref = _reference_model(base, adapter, four_bit=four_bit, quant=quant, trust_remote_code=trust_remote_code)
    ref_lp = _logits(ref, ids, start)
    del ref
    gc.collect()
    results = {}
    kept = None
    for mode in modes:
        model = build_merged(base, adapter, mode, quant=quant, trust_remote_code=trust_remote_code)
        figures = compare_logits(ref_lp, _logits(model, ids, start))
        results[mode] = {"top1": round(figures["top1"], 4), "kl": round(figures["kl"], 5), "positions": figures["positions"]}
        if mode == keep:
            kept = model
        del model
        gc.collect()
    return results, kept


def merge_stage(run: Run, *, into: str | None = None, force: bool = False) -> Path:
    """Merge the run's adapter into a float base; write ``run/merged`` and record it as artifact 'merged'."""
    run.require("train", "trained adapter", "ftedge train --resume")
    require_mergeable(run.recipe(), "merge")
    out = run.path / "merged"
    if run.is_done("merge") and not force and out.is_dir() and run.artifact("merged") is not None:
        log.info("merge already done (%s); use --force to redo it", out)
        return out
    recipe = run.recipe()
    adapter = run.artifact_path("adapter")
    if not adapter.is_dir():
        raise FtedgeError(f"adapter folder {adapter} is missing", hint=f"train it again: `ftedge train --resume {run.path}`")
    check_adapter(adapter)
    mode = into or recipe.export.merge_into
    if mode not in MODES:
        raise FtedgeError(f"unknown merge mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    four_bit = recipe.quant.bits == 4
    note = None
    if not four_bit and mode == "dequantized":
        note = f"quant.bits={recipe.quant.bits}: training used a float base, so the merge is into the float base"
        mode = "float"
    from ftedge.basemodel import parameter_count
    from ftedge.data.prompts import gate_prompts
    from ftedge.data.splits import run_splits

    splits = run_splits(run)  # the validation rows frozen at train time (refused if the data file changed since)
    base = run.base_model()  # the recipe's base model, or train.init_from's merged model
    trust = recipe.trust_remote_code
    need = int(parameter_count(base) * BYTES_PER_WEIGHT["f32"])  # the merged model is float32
    check_free_space(run.path, need, "the merged float32 model")
    with run.stage("merge") as metrics:
        import torch

        torch.manual_seed(0)
        tokenizer = _tokenizer(base, adapter, trust, recipe.chat_template)
        eot = end_of_turn_id(tokenizer)
        eot_text = tokenizer.convert_ids_to_tokens(eot) if eot is not None else ""
        prompts = gate_prompts(splits, recipe, N_PROMPTS)
        texts = [p.text(tokenizer, eot=eot_text) for p in prompts]
        modes = ["dequantized", "float"] if four_bit else ["float"]
        drift, model = measure_drift(
            base, adapter, modes, texts, quant=recipe.quant, four_bit=four_bit, tokenizer=tokenizer, trust_remote_code=trust, keep=mode
        )
        best = min(drift, key=lambda m: (drift[m]["kl"], -drift[m]["top1"]))
        metrics.update(
            mode=mode, reference="base(nf4)+adapter" if four_bit else "base+adapter", drift=drift, better=best, n_prompts=len(texts)
        )
        if note:
            metrics["note"] = note
        if best != mode and drift[best]["kl"] < drift[mode]["kl"]:
            log.warning("merge mode %s drifts more than %s here (KL %.4f vs %.4f)", mode, best, drift[mode]["kl"], drift[best]["kl"])
        with atomic_path(out) as tmp:
            tmp.mkdir()
            _save(model, tokenizer, base, tmp, _tokenizer_source(base, adapter))
        del model
        gc.collect()
        run.record_artifact("merged", out, stage="merge", format="hf", mode=mode, drift=drift[mode])
        log.info("merged (%s) into %s: top-1 %.3f, KL %.4f vs base+adapter", mode, out, drift[mode]["top1"], drift[mode]["kl"])
    return out
