"""Preflight: architecture support is known before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftedge.errors import FtedgeError
from ftedge.hf import HUB_ARCHITECTURES
from ftedge.targets import load_target
from ftedge.validate import check_export_support, gguf_converter_architectures, onnx_builder_architectures, preflight

REPO = Path(__file__).resolve().parents[1]

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
        assert base in HUB_ARCHITECTURES, f"{name}: add {base}'s architecture to ftedge.hf.HUB_ARCHITECTURES"
        check_export_support(HUB_ARCHITECTURES[base], target, name)


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
