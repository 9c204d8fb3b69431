"""The CUDA training path on a tiny random model: NF4 + double quant in use, the adapter trains, packing
keeps examples apart under SDPA, a CUDA-trained adapter merges to the same weights as on the CPU,
resume is exact, bf16 and fp16 compute both train.

Every test is marked ``cuda`` and skipped without a GPU; benchmarks/gpu_check.sh runs them on one
(``pytest -m cuda tests/test_cuda.py``). ``FTEDGE_CUDA_TESTS_ON_CPU=1`` runs the same bodies on the
CPU (the device-specific assertions are skipped there) so they cannot rot unseen:
tests/test_gpu_check.py does that under ``-m slow``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, for the exact-resume test

import pytest
import torch
import yaml

from ftedge.manifest import Run
from ftedge.recipe import load_recipe

pytestmark = pytest.mark.cuda
ON_CPU = "FTEDGE_CUDA_TESTS_ON_CPU"


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if os.environ.get(ON_CPU) == "1":
        torch.set_num_threads(1)
        return torch.device("cpu")
    pytest.skip(f"needs CUDA ({ON_CPU}=1 runs these bodies on the CPU)")


def _qlora(recipe_path: Path, tmp_path: Path, name: str, *, dtype: str = "bfloat16", lora: dict | None = None, **train) -> Run:
    raw = yaml.safe_load(recipe_path.read_text())
    raw["quant"] = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": dtype}
    raw["train"].update({"method": "qlora", **train})
    raw["lora"].update(lora or {})
    path = recipe_path.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return Run.create(load_recipe(path), run_dir=tmp_path / name)


def _records(run: Run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "train" / "metrics.jsonl").read_text().splitlines()]


def _linear4bit(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_qlora_base_is_nf4_with_double_quant(device, tiny_recipe, tmp_path):
    from ftedge.loader import compute_dtype, load_causal_lm
    from ftedge.train.model import load_model

    recipe = _qlora(tiny_recipe, tmp_path, "nf4").recipe()
    base = Path(recipe.base_model)
    model = load_causal_lm(base, dtype=torch.bfloat16, four_bit=recipe.quant, device=device)
    layers = _linear4bit(model)
    assert len(layers) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    for m in layers:
        assert m.weight.quant_type == "nf4" and m.weight.compress_statistics
        state = m.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # double quant: the block scales are quantized too
        assert m.compute_dtype == torch.bfloat16 and m.weight.device.type == device.type
    if device.type != "cuda":
        return  # on the CPU, training dequantizes the NF4 weights once (see train/model.py)
    assert model.config._attn_implementation == "sdpa"
    major = torch.cuda.get_device_capability(device)[0]
    assert compute_dtype("auto", device) == (torch.bfloat16 if major >= 8 else torch.float16)
    trained = load_model(recipe, base, device, torch.bfloat16)
    kept = _linear4bit(trained)
    assert len(kept) == len(layers) and all(not m.weight.requires_grad for m in kept)  # 4-bit base stays 4-bit and frozen
    lora = [p for n, p in trained.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cuda" for p in lora)
    assert [n for n, p in trained.named_parameters() if p.requires_grad and "lora_" not in n] == []


def test_adapter_trains(device, tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    from ftedge.train import train_stage

    run = _qlora(tiny_recipe, tmp_path, "trains", max_steps=8, lr=5e-3, eval_every=4, save_every=8)
    metrics = train_stage(run)
    losses = [r["loss"] for r in _records(run)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1  # it learns
    if device.type == "cuda":
        assert metrics["peak_gpu_mb"] > 0
    weights = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in weights.items())  # B starts at zero


def test_packed_rows_keep_examples_apart(device, tiny_model_dir):
    """The loss of examples packed into one row (position ids, no mask) equals their losses alone."""
    from ftedge.data.encoding import Encoded
    from ftedge.loader import load_causal_lm
    from ftedge.train.batch import make_batch
    from ftedge.train.model import LabelOnlyLoss, label_positions

    model = load_causal_lm(tiny_model_dir, dtype=torch.float32, device=device).eval()
    loss_fn = LabelOnlyLoss(model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 14, 6, 11):
        ids = torch.randint(5, 1000, (n,), generator=gen).tolist()
        rows.append(Encoded(input_ids=ids, labels=[-100] * (n - 3) + ids[n - 3 :]))

    def loss(batch: dict, index: bool = False) -> float:
        batch.pop("n_tokens")
        if index:
            batch["label_index"], batch["label_target"] = label_positions(batch["labels"])
        with torch.no_grad():
            s, _ = loss_fn(**{k: v.to(device) for k, v in batch.items()})
        return float(s)

    alone = sum(loss(make_batch([r], max_length=64, packing=True)) for r in rows)
    packed = make_batch(rows, max_length=64, packing=True)
    assert packed["input_ids"].shape[0] == 1  # all four in one row
    assert loss(dict(packed)) == pytest.approx(alone, rel=1e-4)
    assert loss(dict(packed), index=True) == pytest.approx(loss(dict(packed)), rel=1e-6)  # host-side label positions
    padded = make_batch(rows, max_length=64, packing=False)
    assert loss(padded) == pytest.approx(alone, rel=1e-4)


def test_merge_of_cuda_adapter_equals_cpu_merge(device, tiny_recipe, tmp_path):
    from ftedge.merge import build_merged, merge_stage
    from ftedge.train import train_stage

    run = _qlora(tiny_recipe, tmp_path, "merge", max_steps=4, lr=5e-3, eval_every=4, save_every=4)
    train_stage(run)
    recipe, adapter = run.recipe(), run.path / "adapter"
    base = Path(recipe.base_model)
    here = build_merged(base, adapter, "dequantized", quant=recipe.quant, device=device).state_dict()
    cpu = build_merged(base, adapter, "dequantized", quant=recipe.quant, device=torch.device("cpu")).state_dict()
    plain = build_merged(base, adapter, "float", quant=recipe.quant, device=torch.device("cpu")).state_dict()
    assert here.keys() == cpu.keys()
    moved = 0.0
    for name, c in cpu.items():
        g = here[name].detach().cpu()
        assert g.dtype == c.dtype == torch.float32, name
        scale = float(c.abs().max()) or 1.0
        diff = (g - c).abs()
        assert float(diff.max()) <= 1e-2 * scale, name  # no block of weights dequantized differently
        assert float((diff > 1e-6 * scale).float().mean()) < 1e-3, name  # nearly every weight the very same number
        moved = max(moved, float((c - plain[name]).abs().max()))
    assert moved > 1e-4  # NF4 rounding is in the merge: the comparison can tell merges apart
    out = merge_stage(run)  # and the whole stage runs on this device
    assert any(out.glob("*.safetensors"))


def test_resume_is_exact(device, tiny_recipe, tmp_path, monkeypatch):
    from ftedge.train import loop as train_loop
    from ftedge.train import train_stage

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        kw = dict(max_steps=6, save_every=3, eval_every=2, lr=5e-3)
        full = _qlora(tiny_recipe, tmp_path, "full", lora={"dropout": 0.1}, **kw)  # dropout: the RNG state matters
        train_stage(full)
        cut = _qlora(tiny_recipe, tmp_path, "cut", lora={"dropout": 0.1}, **kw)
        real = train_loop.Trainer.train_step

        def interrupted(self, s):
            if s == 3:  # Ctrl-C during step 4: checkpoint after it, then stop
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, s)

        with monkeypatch.context() as m:
            m.setattr(train_loop.Trainer, "train_step", interrupted)
            with pytest.raises(KeyboardInterrupt):
                train_stage(cut)
        assert (cut.path / "train" / "checkpoints" / "step-000004").is_dir()
        assert train_stage(Run.open(cut.path), resume=True)["steps"] == 6
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = _records(full), _records(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), abs=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bf16_and_fp16_compute_train(device, tiny_recipe, tmp_path, dtype):
    from ftedge.loader import compute_dtype
    from ftedge.train import train_stage
    from ftedge.train.model import load_model

    if device.type == "cpu" and dtype == "float16":
        pytest.skip("fp16 compute is CUDA-only (refused on the CPU)")
    run = _qlora(tiny_recipe, tmp_path, dtype, dtype=dtype, max_steps=10, lr=5e-3, eval_every=5, save_every=10)
    train_stage(run)
    losses = [r["loss"] for r in _records(run)]
    assert all(v == v and abs(v) != float("inf") for v in losses)
    assert losses[-1] < losses[0] - 0.1
    want = getattr(torch, dtype)
    assert compute_dtype(dtype, device) == want
    if device.type == "cuda":
        model = load_model(run.recipe(), Path(run.recipe().base_model), device, want)
        assert {m.compute_dtype for m in _linear4bit(model)} == {want}
