"""Gradual unfreezing and layer-wise learning rates: frozen layers do not change, the metrics say which
layers train, each layer gets its rate, and a resumed run continues exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftedge.manifest import Run
from ftedge.recipe import load_recipe

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run(tiny_recipe: Path, tmp_path: Path, name: str, *, full: bool = False, **train) -> Run:
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"].update(train)
    if full:
        raw["train"]["method"] = "full"
    path = tiny_recipe.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return Run.create(load_recipe(path), run_dir=tmp_path / name)


def _records(run: Run) -> list[dict]:
    return [json.loads(x) for x in (run.path / "train" / "metrics.jsonl").read_text().splitlines()]


def test_frozen_layers_do_not_change(tiny_recipe: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning of the 2-layer model, one more layer every 2 steps: steps 1-2 train only layer 1 (and the
    final norm), step 3 adds layer 0; the tied embeddings (bottom) stay frozen throughout."""
    from ftedge.train import train_stage

    run = _run(tiny_recipe, tmp_path, "full", full=True, max_steps=3, unfreeze={"every": 2}, save_every=2, eval_every=3, lr=1e-2)
    train_stage(run)
    records = _records(run)
    assert [r["lowest_layer"] for r in records] == [1, 1, 0]
    assert [r["layers_trained"] for r in records] == [1, 1, 2]
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    ckpt = run.path / "train" / "checkpoints"
    at2 = load_file(str(ckpt / "step-000002" / "trainable.safetensors"))
    at3 = load_file(str(ckpt / "step-000003" / "trainable.safetensors"))

    def same(state: dict, key: str) -> bool:
        return torch.equal(state[key], initial[key])

    layer0 = [k for k in at2 if ".layers.0." in k]
    layer1 = [k for k in at2 if ".layers.1." in k]
    assert layer0 and layer1 and "model.embed_tokens.weight" in at2  # checkpoints hold frozen weights too
    assert all(same(at2, k) for k in layer0) and same(at2, "model.embed_tokens.weight")  # frozen: bit-identical
    assert not any(same(at2, k) for k in layer1 if k.endswith("proj.weight"))  # trained
    assert not any(same(at3, k) for k in layer0 if k.endswith("proj.weight"))  # unfrozen at step 3
    assert same(at3, "model.embed_tokens.weight")


def test_layer_learning_rates(tiny_recipe: Path) -> None:
    """layer_lr_decay 0.5 on full fine-tuning: top layer and head at lr, layer 0 at lr/2, embeddings at lr/4."""
    from transformers import AutoModelForCausalLM

    from ftedge.train.layers import LayerSchedule

    recipe = load_recipe(tiny_recipe, ["train.method=full", "train.layer_lr_decay=0.5", "train.lr=0.01"])
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model)
    groups = LayerSchedule(model, recipe.train).param_groups()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["model.layers.1.self_attn.q_proj.weight"])] == pytest.approx(0.01)
    assert lr_of[id(names["model.norm.weight"])] == pytest.approx(0.01)
    assert lr_of[id(names["model.layers.0.mlp.down_proj.weight"])] == pytest.approx(0.005)
    assert lr_of[id(names["model.embed_tokens.weight"])] == pytest.approx(0.0025)
    assert len(lr_of) == len(names)  # every weight in exactly one group


def test_lora_unfreezing_with_layer_rates_resumes_exactly(tiny_recipe: Path, tmp_path: Path, monkeypatch) -> None:
    """LoRA, one more layer every 2 steps and decay 0.5: a run stopped after step 3 and resumed from its step-2
    checkpoint logs the same losses, evaluations and frozen layers as the uninterrupted run."""
    from ftedge.train import loop, train_stage

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["lora"]["dropout"] = 0.1  # RNG state matters for an exact resume
    tiny_recipe.write_text(yaml.safe_dump(raw))
    opts = {"max_steps": 6, "unfreeze": {"every": 2}, "layer_lr_decay": 0.5, "save_every": 2, "eval_every": 2}
    full = _run(tiny_recipe, tmp_path, "whole", **opts)
    train_stage(full)
    cut = _run(tiny_recipe, tmp_path, "cut", **opts)
    real = loop.Trainer.train_step

    def stop_at_4(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step)

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "train_step", stop_at_4)
        with pytest.raises(KeyboardInterrupt):
            train_stage(cut)
    assert train_stage(Run.open(cut.path), resume=True)["steps"] == 6
    a, b = _records(full), _records(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["lowest_layer"] for r in a] == [1, 1, 0, 0, -1, -1]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), abs=1e-6)
        assert (rb["lowest_layer"], rb["lr"]) == (ra["lowest_layer"], ra["lr"])
