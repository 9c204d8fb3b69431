"""Preflight: architecture support is known before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftedge.backends.ortgenai import builder_architectures
from ftedge.errors import FtedgeError
from ftedge.families import HUB_ARCHITECTURES
from ftedge.targets import load_target
from ftedge.validate import check_export_support, gguf_converter_architectures, preflight

REPO = Path(__file__).resolve().parents[1]


def test_registries_are_read_from_installed_tools() -> None:
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= gguf_converter_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"} <= builder_architectures()


def test_hub_recipes_name_exportable_models() -> None:
    target = load_target("laptop-cpu")
    hub = {}
    for path in (REPO / "recipes").glob("*.yaml"):
        base = yaml.safe_load(path.read_text())["base_model"]
        if "/" in base:
            hub[path.name] = base
    assert len(hub) >= 4
    for name, base in hub.items():
        assert base in HUB_ARCHITECTURES, f"{name}: add {base}'s architecture to ftedge.families.HUB_ARCHITECTURES"
        check_export_support(HUB_ARCHITECTURES[base], target, name)


def test_unsupported_architecture_fails_before_training(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    odd = tmp_path / "odd-model"
    odd.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    (odd / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")
    with pytest.raises(FtedgeError, match="MadeUpForCausalLM is not supported by the GGUF converter"):
        preflight(tiny_recipe, [f"base_model={odd}"])


def test_onnx_only_checked_when_target_wants_onnx() -> None:
    pi = load_target("raspberry-pi-5")  # GGUF only
    assert "GGUF" in check_export_support("LlamaForCausalLM", pi, "x")[0]
    with pytest.raises(FtedgeError, match="GGUF converter"):
        check_export_support("MadeUpForCausalLM", pi, "x")


def _recipe_with(tiny_recipe: Path, tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw.update(changes)
    path = tiny_recipe.parent / "changed.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _without_template(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model as a pretrained-only folder: no chat template anywhere."""
    import shutil

    base = tmp_path / "pretrained-only"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    return base


def test_a_base_without_chat_template_needs_one_from_the_recipe(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    base = _without_template(tiny_model_dir, tmp_path)
    with pytest.raises(FtedgeError, match="has no chat template") as err:
        preflight(tiny_recipe, [f"base_model={base}"])
    assert "chat_template:" in err.value.one_line() and "\n" not in err.value.one_line()
    lines = preflight(tiny_recipe, [f"base_model={base}", "chat_template=chatml"])
    assert "chat template: chatml (recipe)" in lines
    with pytest.raises(FtedgeError, match="neither a built-in template nor an existing .jinja file"):
        preflight(tiny_recipe, [f"base_model={base}", "chat_template=vicuna"])


def test_a_jinja_chat_template_is_found_beside_the_recipe(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from ftedge.formats.chat_template import read_chat_template
    from ftedge.recipe import load_recipe

    base = _without_template(tiny_model_dir, tmp_path)
    (tiny_recipe.parent / "mine.jinja").write_text(read_chat_template("chatml"))
    recipe = load_recipe(_recipe_with(tiny_recipe, tmp_path, base_model=str(base), chat_template="mine.jinja"))
    assert recipe.chat_template == str(tiny_recipe.parent / "mine.jinja")
    assert "chat template: " + recipe.chat_template + " (recipe)" in preflight(
        _recipe_with(tiny_recipe, tmp_path, base_model=str(base), chat_template="mine.jinja")
    )


def test_lora_targets_the_model_lacks_fail_before_training(tiny_recipe: Path) -> None:
    with pytest.raises(FtedgeError, match=r"LlamaForCausalLM has no module named qkv_proj \(it has .*q_proj"):
        preflight(tiny_recipe, ["lora.target_modules=[qkv_proj, o_proj]"])
    assert preflight(tiny_recipe, ["lora.target_modules=[q_proj, v_proj]"])


def test_architecture_of_a_gguf_base_comes_from_its_header(tiny_recipe: Path) -> None:
    from ftedge.families import base_architecture

    arch = base_architecture("smollm2-135m-instruct")
    assert (arch.name, arch.source, arch.gguf_arch) == ("LlamaForCausalLM", "GGUF header", "llama")
    lines = preflight(tiny_recipe, ["base_model=smollm2-135m-instruct"])
    assert "architecture LlamaForCausalLM: exportable to GGUF and ONNX (from the GGUF header)" in lines


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    """The header says which architecture; one the .gguf loader does not know stops before any download or training."""
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="madeup")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FtedgeError, match="transformers cannot read a GGUF of architecture 'madeup'"):
        preflight(tiny_recipe, [f"base_model={path}"])


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


def test_shipped_chat_recipes_validate_offline() -> None:
    """The chat recipes name hub models; their architecture is known without a download (ftedge.families.HUB_ARCHITECTURES)."""
    recipes = [p for p in (REPO / "recipes").glob("*-chat.yaml") if "/" in yaml.safe_load(p.read_text())["base_model"]]
    assert len(recipes) >= 4
    for path in recipes:
        lines = preflight(path)
        assert any(line.endswith("(from the known hub id)") for line in lines), (path.name, lines)
