"""adapter.method: DoRA and IA3 train under QLoRA and plain LoRA and merge exactly; prefix tuning trains and
benches in PyTorch, and says in one line why it is not merged or exported; the old `lora:` section still reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ftedge.cli import main
from ftedge.manifest import Run
from ftedge.recipe import load_recipe

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _recipe(tiny_recipe: Path, method: str, train_method: str = "lora", **train) -> Path:
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw.pop("lora")
    raw["adapter"] = {"method": method, "r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 4}
    raw["quant"] = {"bits": 4, "compute_dtype": "bfloat16"} if train_method == "qlora" else {"bits": 32, "compute_dtype": "float32"}
    raw["train"].update({"method": train_method, "max_steps": 2, "eval_every": 2, "save_every": 2, "lr": 1e-2, **train})
    path = tiny_recipe.with_name(f"{method}-{train_method}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_and_merge(tiny_recipe: Path, tmp_path: Path, method: str, train_method: str) -> Run:
    from ftedge.merge import merge_stage
    from ftedge.train import train_stage

    run = Run.create(load_recipe(_recipe(tiny_recipe, method, train_method)), run_dir=tmp_path / f"{method}-{train_method}")
    train_stage(run)
    adapter = run.artifact("adapter")
    assert adapter.entry["adapter_method"] == method
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA") and config.get("use_dora", False) == (method == "dora")
    merge_stage(run)
    return run


def _assert_exact_merge(run: Run, qlora: bool) -> None:
    metrics = run.manifest()["stages"]["merge"]["metrics"]
    drift = metrics["drift"]["dequantized" if qlora else "float"]
    assert metrics["mode"] == ("dequantized" if qlora else "float")
    if qlora:  # the reference computes in bf16 on the NF4 base, the merged model in fp32 (as for LoRA in test_merge)
        assert drift["top1"] >= 0.98 and drift["kl"] < 1e-4, drift
        assert drift["kl"] <= metrics["drift"]["float"]["kl"]
    else:  # same float weights: the merged model is exactly what was trained
        assert drift["top1"] == 1.0 and drift["kl"] < 1e-6, drift
    assert run.artifact("merged") is not None


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_train_under_qlora_and_merge_exactly(tiny_recipe: Path, tmp_path: Path, method: str) -> None:
    run = _train_and_merge(tiny_recipe, tmp_path, method, "qlora")
    _assert_exact_merge(run, qlora=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_every_method_under_plain_lora_merges_exactly(tiny_recipe: Path, tmp_path: Path, method: str) -> None:
    _assert_exact_merge(_train_and_merge(tiny_recipe, tmp_path, method, "lora"), qlora=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_run_through_gguf_and_onnx_gates(tiny_recipe: Path, tmp_path: Path, method: str) -> None:
    """`ftedge run` with each method: merged, exported to GGUF and ONNX, each gated, benched and shipped."""
    target = {
        "name": "tiny-both",
        "gguf": {"quants": ["q8_0"]},
        "onnx": {"precisions": ["fp32"]},
        "n_ctx": 256,
        "threads": 1,
        "ship": "q8_0",
        "gates": {
            "f16": {"min_top1_confident": 0.95, "max_kl": 0.01, "max_kl_p99": 0.1},
            "q8_0": {"min_top1_confident": 0.5, "max_kl": 0.1, "max_kl_p99": 1.0},
        },
    }
    target_path = tmp_path / "tiny-both.yaml"
    target_path.write_text(yaml.safe_dump(target))
    recipe = _recipe(tiny_recipe, method, "qlora", max_steps=4)
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(recipe),
            "-o",
            f"export.target={target_path}",
            "-o",
            "eval.max_examples=4",
            "-o",
            "eval.drift=false",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert res.exit_code == 0, res.output
    run = Run.open(run_dir)
    arts = {a.key: a for a in run.models()}
    assert {"merged", "gguf-f16", "gguf-q8_0", "onnx-fp32"} <= set(arts)
    assert all(arts[k].gate_passed for k in ("gguf-f16", "gguf-q8_0", "onnx-fp32"))
    assert run.artifact("ship") is not None


def test_prefix_tuning_trains_benches_and_stops_before_export(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = _recipe(tiny_recipe, "prefix", "lora", packing=False)
    cli = CliRunner()
    res = cli.invoke(main, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if "cannot be merged" in line]
    assert len(notes) == 1 and "adapter.method=prefix" in notes[0] and "no GGUF/ONNX export" in notes[0]

    run_dir = tmp_path / "prefix-run"
    res = cli.invoke(main, ["run", str(recipe), "-o", "eval.max_examples=4", "-o", "eval.drift=false", "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    run = Run.open(run_dir)
    assert run.is_done("train") and run.is_done("bench")
    assert run.stage_status("merge") == run.stage_status("export") == run.stage_status("ship") == "pending"
    assert set(run.artifacts()) >= {"adapter"} and not run.models()
    results = json.loads((run_dir / "bench" / "results.json").read_text())
    (entry,) = results["artifacts"]
    assert entry["name"] == "pytorch" and entry["status"] == "ok" and entry["quant"] == "f32+prefix" and entry["accuracy"] is not None

    res = cli.invoke(main, ["merge", str(run_dir)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "merge: adapter.method=prefix" in res.output and "cannot be merged" in res.output
    res = cli.invoke(main, ["export", str(run_dir)])
    assert res.exit_code == 2 and "export: adapter.method=prefix" in res.output


def test_prefix_adapter_generates_what_its_logits_say(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The torch backend decodes a prefix-tuning adapter step by step with the prefix once in the cache:
    each greedy token is the argmax of the full-sequence logits (peft's own forward)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftedge.backends import load_backend

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(50.0)  # a prefix strong enough to change the answers
    model.save_pretrained(tmp_path / "prefix")
    backend = load_backend(tiny_model_dir, adapter=tmp_path / "prefix")
    prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "where is my card"}]))
    out = list(backend.generate(prompt, max_new_tokens=8, stop_ids=set()))
    logits = backend.logits(prompt + out)
    assert [int(logits[len(prompt) - 1 + i].argmax()) for i in range(len(out))] == out
    plain = load_backend(tiny_model_dir)
    assert list(plain.generate(prompt, max_new_tokens=8, stop_ids=set())) != out  # the prefix is in effect


def test_prefix_needs_unpacked_rows(tiny_recipe: Path) -> None:
    from ftedge.errors import FtedgeError

    with pytest.raises(FtedgeError, match="adapter.method=prefix needs train.packing=false"):
        load_recipe(_recipe(tiny_recipe, "prefix", "lora", packing=True))


def test_top_layers_adapts_only_the_top_layers_and_merges_exactly(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """adapter.top_layers=1 on the 2-layer tiny model: LoRA weights only in layer 1 (every linear of it), layer 0 of the
    merged model is the base's own, and the merge is exact; methods without per-layer LoRA weights are refused."""
    from safetensors.torch import load_file

    from ftedge.errors import FtedgeError
    from ftedge.merge import merge_stage
    from ftedge.train import train_stage

    raw = yaml.safe_load(_recipe(tiny_recipe, "lora").read_text())
    raw["adapter"]["top_layers"] = 1
    path = tmp_path / "top.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = Run.create(load_recipe(path), run_dir=tmp_path / "top")
    train_stage(run)
    weights = load_file(str(run.artifact("adapter").path / "adapter_model.safetensors"))
    layers = {name.split(".layers.")[1].split(".")[0] for name in weights}
    assert layers == {"1"}, sorted(weights)
    adapted = {name.split(".layers.1.")[1].split(".lora_")[0] for name in weights}
    assert adapted == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    merge_stage(run)
    _assert_exact_merge(run, qlora=False)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(run.artifact("merged").path / "model.safetensors"))
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged[q.format(0)], base[q.format(0)].to(merged[q.format(0)].dtype))
    assert not torch.equal(merged[q.format(1)], base[q.format(1)].to(merged[q.format(1)].dtype))
    for method in ("ia3", "prefix"):
        raw["adapter"]["method"] = method
        raw["train"]["packing"] = False
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(FtedgeError, match="adapter.top_layers works with LoRA and DoRA"):
            load_recipe(path)


def _saved_random_adapter(model_dir: Path, out: Path, ids: list[int], *, use_dora: bool, targets: Any = "all-linear") -> np.ndarray:
    """A LoRA/DoRA adapter with random (non-zero) weights saved to ``out``; peft's unmerged logits for ``ids``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(out)
    with torch.inference_mode():
        return peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_dora_reference_computes_its_weight_norms_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The PyTorch backend caches DoRA's weight norms (the adapter is fixed there): the logits are peft's uncached ones."""
    from peft.tuners.lora import dora

    from ftedge.backends.torch import TorchBackend

    ids = list(range(5, 25))
    dora.ENABLE_DORA_CACHING = False
    expected = _saved_random_adapter(tiny_model_dir, tmp_path / "dora", ids, use_dora=True)
    backend = TorchBackend(tiny_model_dir, adapter=tmp_path / "dora", merge_adapter=False)  # as on 16-bit weights
    try:
        first, again = backend.logits(ids), backend.logits(ids)
        assert dora.ENABLE_DORA_CACHING
        layer = next(m for m in backend.model.modules() if isinstance(m, dora.DoraLinearLayer))
        assert layer._dora_cache, "no DoRA value was cached"
    finally:
        dora.ENABLE_DORA_CACHING = False
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("use_dora", [False, True])
def test_float32_reference_merges_the_adapter_exactly(tiny_model_dir: Path, tmp_path: Path, use_dora: bool) -> None:
    """On float32 weights the PyTorch backend merges a LoRA/DoRA adapter in memory: no adapter layer is left, and
    the logits and greedy tokens are peft's unmerged ones (float32 rounding apart)."""
    from peft.tuners.lora import LoraLayer

    from ftedge.backends.torch import TorchBackend

    ids = list(range(5, 25))
    expected = _saved_random_adapter(tiny_model_dir, tmp_path / "adapter", ids, use_dora=use_dora)
    merged = TorchBackend(tiny_model_dir, adapter=tmp_path / "adapter", threads=1)
    unmerged = TorchBackend(tiny_model_dir, adapter=tmp_path / "adapter", threads=1, merge_adapter=False)
    assert merged.adapter_merged and merged.settings["adapter"] == "merged in memory"
    assert not any(isinstance(m, LoraLayer) for m in merged.model.modules())
    assert not unmerged.adapter_merged and any(isinstance(m, LoraLayer) for m in unmerged.model.modules())
    got = merged.logits(ids)
    assert float(np.abs(expected - TorchBackend(tiny_model_dir, threads=1).logits(ids)).max()) > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert list(merged.generate(ids, max_new_tokens=8, stop_ids=set())) == list(unmerged.generate(ids, max_new_tokens=8, stop_ids=set()))


def test_adapter_on_a_tied_lm_head_stays_unmerged(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The tiny model ties its LM head to the embedding: merging a LoRA on lm_head would change both, so the
    reference keeps the adapter as trained (and gives peft's logits)."""
    from ftedge.backends.torch import TorchBackend

    ids = list(range(5, 25))
    expected = _saved_random_adapter(tiny_model_dir, tmp_path / "adapter", ids, use_dora=False, targets=["q_proj", "lm_head"])
    backend = TorchBackend(tiny_model_dir, adapter=tmp_path / "adapter", threads=1)
    assert backend.model.config.tie_word_embeddings and not backend.adapter_merged
    np.testing.assert_allclose(backend.logits(ids), expected, atol=1e-5)


def test_old_lora_section_still_reads(tiny_recipe: Path, tmp_path: Path) -> None:
    """Recipes (and frozen run recipes) written with `lora:` load as `adapter:`; `-o lora.r=8` still works."""
    old = load_recipe(tiny_recipe)  # conftest's recipe uses lora:
    assert old.adapter.method == "lora" and old.adapter.r == 4 and old.lora is old.adapter
    new = _recipe(tiny_recipe, "dora")
    assert load_recipe(new, ["lora.r=8"]).adapter.r == 8 and load_recipe(new, ["lora.r=8"]).adapter.method == "dora"
    dumped = yaml.safe_load((Run.create(old, run_dir=tmp_path / "r").path / "recipe.yaml").read_text())
    assert "adapter" in dumped and "lora" not in dumped


def test_prefix_training_loss_is_peft_forward(tiny_model_dir: Path) -> None:
    """The loss's prefix path (decoder + peft's key/value prefix + extended mask) gives peft's own logits."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftedge.train.model import LabelOnlyLoss

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    )
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 9:] = -100
    logits, _, keep = LabelOnlyLoss(model).labelled_logits(ids, labels, attention_mask=mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        with model.disable_adapter():
            without = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
    assert (logits.detach() - without).abs().max() > 1e-2  # the prefix counts
