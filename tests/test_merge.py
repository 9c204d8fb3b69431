"""Merge stage: float and dequantized-NF4 modes, drift figures, idempotence, bad adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_run

from ftedge.errors import FtedgeError, StageMissingError


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def test_float_merge_writes_a_complete_model_matching_base_plus_adapter(tmp_path: Path, base_and_adapter) -> None:
    from ftedge.merge import merge_stage

    base, adapter = base_and_adapter
    run = make_run(tmp_path, base, adapter)
    out = merge_stage(run)
    assert out == run.path / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2  # <|im_end|> ends a turn
    merged, original = _tensors(out), _tensors(base)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not any("lora" in k for k in merged)
    assert (merged[key] - original[key]).abs().max() > 1e-4  # the adapter changed the weights
    stage = run.manifest()["stages"]["merge"]
    assert stage["status"] == "done"
    assert stage["metrics"]["mode"] == "float"
    assert stage["metrics"]["drift"]["float"]["top1"] >= 0.99
    assert stage["metrics"]["drift"]["float"]["kl"] < 1e-3
    entry = run.artifacts()["merged"]
    assert entry["mode"] == "float" and entry["sha256"]
    usual = 0o666 & ~_umask()  # another account (an Ollama service, a second user) can read a shipped model
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: usual for p in out.iterdir()}

    # idempotent: a finished merge is skipped, --force redoes it
    recorded = entry["recorded"]
    assert merge_stage(run) == out
    assert run.artifacts()["merged"]["recorded"] == recorded
    merge_stage(run, force=True)
    assert run.artifacts()["merged"]["sha256"] == entry["sha256"]  # deterministic


def test_dequantized_merge_measures_both_modes_and_keeps_float_weights(tmp_path: Path, base_and_adapter) -> None:
    import torch

    from ftedge.merge import merge_stage

    base, adapter = base_and_adapter
    run = make_run(tmp_path, base, adapter, qlora=True)
    out = merge_stage(run)
    metrics = run.manifest()["stages"]["merge"]["metrics"]
    assert metrics["mode"] == "dequantized"
    assert metrics["reference"] == "base(nf4)+adapter"
    drift = metrics["drift"]
    assert set(drift) == {"dequantized", "float"}
    # merging into what QLoRA trained against tracks the trained model at least as well
    assert drift["dequantized"]["kl"] <= drift["float"]["kl"]
    assert drift["dequantized"]["top1"] >= 0.95
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(t.dtype == torch.float32 for t in _tensors(out).values())

    merge_stage(run, into="float", force=True)
    assert run.artifacts()["merged"]["mode"] == "float"


def test_merge_needs_the_train_stage(tmp_path: Path, base_and_adapter) -> None:
    from ftedge.manifest import Run
    from ftedge.merge import merge_stage
    from ftedge.recipe import load_recipe

    base, adapter = base_and_adapter
    (tmp_path / "a").mkdir()
    recipe_path = make_run(tmp_path / "a", base, adapter).path / "recipe.yaml"
    run = Run.create(load_recipe(recipe_path, check_files=False), run_dir=tmp_path / "untrained")
    with pytest.raises(StageMissingError, match="ftedge train"):
        merge_stage(run)


@pytest.mark.parametrize("damage", ["weights", "config", "missing"])
def test_corrupt_adapter_is_one_clear_error(tmp_path: Path, base_and_adapter, damage: str) -> None:
    import shutil

    from ftedge.merge import merge_stage

    base, adapter = base_and_adapter
    run = make_run(tmp_path, base, adapter)
    ad = run.path / "adapter"
    if damage == "weights":
        (ad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif damage == "config":
        (ad / "adapter_config.json").write_text("{not json")
    else:
        shutil.rmtree(ad)
    with pytest.raises(FtedgeError) as info:
        merge_stage(run)
    assert "\n" not in str(info.value)
    assert "adapter" in str(info.value)
    assert not (run.path / "merged").exists()
    assert "merged" not in run.artifacts()


def test_unknown_merge_mode(tmp_path: Path, base_and_adapter) -> None:
    from ftedge.merge import merge_stage

    base, adapter = base_and_adapter
    run = make_run(tmp_path, base, adapter)
    with pytest.raises(FtedgeError, match="unknown merge mode"):
        merge_stage(run, into="int4")


def test_merge_refuses_when_the_data_file_changed_since_training(tmp_path: Path, base_and_adapter) -> None:
    """The gate prompts are the validation rows frozen at train time: a changed data file is refused in one line."""
    from ftedge.merge import merge_stage

    run = make_run(tmp_path, *base_and_adapter)
    data = tmp_path / "train.csv"
    lines = data.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",another_label"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(FtedgeError) as err:
        merge_stage(run)
    msg = str(err.value)
    assert "\n" not in msg and f"data file {data} changed since run {run.path} was trained" in msg and "ftedge train" in msg
    assert run.stage_status("merge") == "pending" and not (run.path / "merged").exists()
