"""Preflight: architecture support is known before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftedge.errors import FtedgeError
from ftedge.targets import load_target
from ftedge.validate import check_export_support, gguf_converter_architectures, onnx_builder_architectures, preflight

REPO = Path(__file__).resolve().parents[1]
# Architectures of the hub models our recipes name (from their config.json on the hub).
HUB_RECIPE_ARCH = {
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen2ForCausalLM",
    "meta-llama/Llama-3.2-1B-Instruct": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "LlamaForCausalLM",
}


def test_registries_are_read_from_installed_tools() -> None:
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= gguf_converter_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"} <= onnx_builder_architectures()


def test_hub_recipes_name_exportable_models() -> None:
    target = load_target("laptop-cpu")
    hub = {}
    for path in (REPO / "recipes").glob("*.yaml"):
        base = yaml.safe_load(path.read_text())["base_model"]
        if "/" in base:
            hub[path.name] = base
    assert len(hub) >= 4
    for name, base in hub.items():
        assert base in HUB_RECIPE_ARCH, f"{name}: add {base}'s architecture to this test"
        check_export_support(HUB_RECIPE_ARCH[base], target, name)


def test_unsupported_architecture_fails_before_training(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    odd = tmp_path / "odd-model"
    odd.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtedgeError, match="MadeUpForCausalLM is not supported by the GGUF converter"):
        preflight(tiny_recipe, [f"base_model={odd}"])


def test_onnx_only_checked_when_target_wants_onnx() -> None:
    pi = load_target("raspberry-pi-5")  # GGUF only
    assert "GGUF" in check_export_support("LlamaForCausalLM", pi, "x")[0]
    with pytest.raises(FtedgeError, match="GGUF converter"):
        check_export_support("MadeUpForCausalLM", pi, "x")


def test_general_prompts_are_checked_before_training(tiny_recipe: Path, tmp_path: Path) -> None:
    mine = tmp_path / "general.jsonl"
    mine.write_text('{"prompt": "Name a colour."}\n{"text": "Some text of my own."}\n')
    lines = preflight(tiny_recipe, ["eval.general_prompts=general.jsonl"])  # relative to the recipe's folder
    assert "eval.general_prompts: 1 prompts, 1 texts for the drift check" in lines
    mine.write_text('{"prompt": "Name a colour."}\n{"answer": "red"}\n')
    with pytest.raises(FtedgeError, match="general.jsonl:2: no 'prompt', 'messages' or 'text'"):
        preflight(tiny_recipe, ["eval.general_prompts=general.jsonl"])
    with pytest.raises(FtedgeError, match="eval.general_prompts: file .*missing.jsonl not found"):
        preflight(tiny_recipe, ["eval.general_prompts=missing.jsonl"])
