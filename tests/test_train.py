"""The train stage on a tiny random model: artifacts, resume, Ctrl-C, early stopping, methods."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.recipe import load_recipe

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run(recipe_path: Path, tmp_path: Path, name: str = "run", **train) -> Run:
    raw = yaml.safe_load(recipe_path.read_text())
    raw["train"].update(train)
    path = recipe_path.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return Run.create(load_recipe(path), run_dir=tmp_path / name)


def _losses(run: Run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "train" / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_adapter_metrics_and_is_idempotent(tiny_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftedge.train import train_stage

    run = _run(tiny_recipe, tmp_path, max_steps=6, lr=5e-3)
    metrics = train_stage(run)
    assert metrics["steps"] == 6 and metrics["tokens"] > 0 and metrics["peak_rss_mb"] > 0 and metrics["best_eval_loss"] is not None
    records = _losses(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sum("eval_loss" in r for r in records) == 3
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    art = run.artifacts(stage="train")["adapter"]
    assert art["format"] == "peft" and Path(art["base_model"]).is_dir()
    assert run.is_done("train") and run.manifest()["stages"]["train"]["metrics"]["steps"] == 6
    # the splits are frozen into the run: the rows every later stage reads back (run_splits) are the ones split now
    from ftedge.data.splits import load_splits, run_splits

    assert run.artifacts(stage="train")["splits"]["path"] == "splits.json" and (run.path / "splits.json").is_file()
    frozen, now = run_splits(run), load_splits(run.recipe())
    for name in ("train", "val", "test"):
        assert [(e.source, e.target) for e in getattr(frozen, name)] == [(e.source, e.target) for e in getattr(now, name)]
    assert list((run.path / "train").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run.path / "train" / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000006"]  # the last two kept
    # the adapter is the best-eval one and loads with peft
    best = json.loads((run.path / "adapter" / "ftedge-train.json").read_text())
    assert best["eval_loss"] == pytest.approx(min(r["eval_loss"] for r in records if "eval_loss" in r), abs=1e-5)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(art["base_model"]), str(run.path / "adapter"))
    assert model is not None
    # a finished stage is skipped
    before = run.manifest()["stages"]["train"]["finished"]
    assert train_stage(run)["steps"] == 6
    assert run.manifest()["stages"]["train"]["finished"] == before


@pytest.mark.parametrize("max_norm", [1e-3, None])
def test_gradient_clipping(tiny_recipe, tmp_path, monkeypatch, max_norm):
    from ftedge.train import train_stage

    seen: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = _run(tiny_recipe, tmp_path, max_steps=2, max_grad_norm=max_norm)
    train_stage(run)
    records = _losses(run)
    assert len(seen) == 2
    if max_norm is None:
        assert all("grad_norm" not in r for r in records) and min(seen) > 1e-2
    else:  # the optimizer sees the clipped gradient; the log shows the norm before clipping
        assert max(seen) <= max_norm * 1.001
        assert all(r["grad_norm"] > 10 * max_norm for r in records)


def _interrupt_at(monkeypatch, step: int) -> None:
    """Send SIGINT (Ctrl-C) to ourselves during the given training step."""
    from ftedge.train import loop as train_loop

    real = train_loop.Trainer.train_step

    def fake(self, s):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, s)

    monkeypatch.setattr(train_loop.Trainer, "train_step", fake)


def test_ctrl_c_checkpoints_and_resume_matches_uninterrupted(tiny_recipe, tmp_path, monkeypatch):
    from ftedge.train import train_stage

    lora = {"dropout": 0.1}  # RNG state matters for an exact resume
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["lora"].update(lora)
    tiny_recipe.write_text(yaml.safe_dump(raw))
    full = _run(tiny_recipe, tmp_path, "full", max_steps=8, save_every=4, eval_every=2)
    train_stage(full)
    cut = _run(tiny_recipe, tmp_path, "cut", max_steps=8, save_every=4, eval_every=2)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train_stage(cut)
    assert cut.stage_status("train") == "failed"
    assert (cut.path / "train" / "checkpoints" / "step-000003").is_dir()  # saved on Ctrl-C, off the save_every grid
    data = Path(cut.recipe().data.train)
    kept = data.read_bytes()
    data.write_text(kept.decode().replace("card", "Card", 1))  # resuming trains on the frozen rows: a changed file is refused
    with pytest.raises(FtedgeError, match=f"data file {data} changed since run {cut.path} was trained: 1 of the "):
        train_stage(Run.open(cut.path), resume=True)
    data.write_bytes(kept)
    assert train_stage(Run.open(cut.path), resume=True)["steps"] == 8
    a, b = _losses(full), _losses(cut)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), abs=1e-5)
    assert cut.is_done("train")


def test_early_stopping(tiny_recipe, tmp_path):
    from ftedge.train import train_stage

    # a vanishing lr: the eval loss stops improving, so patience 2 stops two evaluations after the best
    run = _run(
        tiny_recipe, tmp_path, max_steps=20, eval_every=1, early_stopping_patience=2, lr=1e-12, warmup_ratio=0.0, scheduler="constant"
    )
    metrics = train_stage(run)
    evals = [r["eval_loss"] for r in _losses(run)]
    best = min(range(len(evals)), key=evals.__getitem__)
    assert metrics["stopped_early"] and metrics["steps"] == best + 3 < 20
    assert metrics["best_step"] == best + 1


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods(tiny_recipe, tmp_path, method):
    from ftedge.train import train_stage

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"].update(method=method, max_steps=2, eval_every=2, save_every=2)
    raw["quant"] = {"bits": 4, "type": "nf4", "compute_dtype": "bfloat16"} if method == "qlora" else {"bits": 32, "compute_dtype": "auto"}
    path = tiny_recipe.with_name(f"{method}.yaml")
    path.write_text(yaml.safe_dump(raw))
    run = Run.create(load_recipe(path), run_dir=tmp_path / method)
    metrics = train_stage(run)
    assert metrics["steps"] == 2
    art = run.artifacts(stage="train")["adapter"]
    files = {p.name for p in (run.path / "adapter").iterdir()}
    if method == "full":
        assert art["format"] == "hf" and "model.safetensors" in files
    else:
        assert art["format"] == "peft" and "adapter_model.safetensors" in files


def test_bad_data_fails_before_model_load(tiny_recipe, tmp_path, monkeypatch):
    from ftedge.train import model as train_model
    from ftedge.train import train_stage

    run = _run(tiny_recipe, tmp_path)
    (Path(run.recipe().data.train)).write_text("text,category\nhello,a\nhi,a\nyo,a\nsup,a\n")
    monkeypatch.setattr(train_model, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(FtedgeError, match="single class"):
        train_stage(run)


def test_two_process_ddp_matches_one_process(tiny_recipe, tmp_path):
    """`ftedge train` under torchrun (the launcher `accelerate launch --multi_gpu` uses), 2 CPU
    processes (gloo), batch 2 each = one process with batch 4; both ranks share one run folder."""
    import subprocess
    import sys

    from ftedge.train import train_stage

    one = _run(tiny_recipe, tmp_path, "one", max_steps=4, batch_size=4, eval_every=2)
    train_stage(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "ftedge.cli",
        "train",
        str(tiny_recipe),
        "-o",
        "train.max_steps=4",
        "-o",
        "train.batch_size=2",
        "-o",
        "train.eval_every=2",
    ]
    # without one shared --run-dir each rank would make its own folder: refused in one line
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert (
        proc.returncode != 0 and "need one shared run folder" in proc.stderr and "FtedgeError" not in proc.stderr
    )  # torchrun adds its own traceback
    proc = subprocess.run([*launch, "--run-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Run.open(tmp_path / "two")
    assert two.is_done("train")
    a, b = _losses(one), _losses(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), abs=1e-4)
        assert rb["tokens"] == ra["tokens"]


def test_label_positions_match_the_labels_mask():
    """The host-side positions the loop hands the loss are the labels mask's, in the same order."""
    from ftedge.train.model import label_positions

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[torch.rand(3, 11, generator=gen) < 0.6] = -100
    index, target = label_positions(labels)
    keep = labels[:, 1:] != -100
    hidden = torch.randn(3, 11, 5, generator=gen)
    assert torch.equal(hidden.flatten(0, 1)[index], hidden[:, :-1][keep])
    assert torch.equal(target, labels[:, 1:][keep]) and int(keep.sum()) == index.numel() > 0


def _loss_and_grads(loss_module, model, batch):
    from ftedge.train.model import label_positions

    b = {k: v for k, v in batch.items() if k != "n_tokens"}
    b["label_index"], b["label_target"] = label_positions(b["labels"])
    total, n = loss_module(**b)
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(total), int(n), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_attention_in_one_row_matches_rows_of_max_length(tiny_recipe, checkpointing):
    """A micro-batch laid in one unpadded row with the packed attention gives the loss and gradients of
    the same examples in padded rows of max_length with transformers' block-diagonal SDPA mask."""
    from ftedge.data.encoding import Encoded
    from ftedge.train.batch import make_batch
    from ftedge.train.model import LabelOnlyLoss, load_model, packed_attention_index

    recipe = load_recipe(tiny_recipe, [f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = load_model(recipe, recipe.base_model, torch.device("cpu"), torch.float32)
    loss_module = LabelOnlyLoss(model)
    assert loss_module.packed_attention
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (7, 19, 3, 30, 11, 25, 2, 16):
        ids = torch.randint(3, 100, (n,), generator=gen).tolist()
        rows.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2 :]))
    padded = make_batch(rows, max_length=40, packing=True)
    one = make_batch(rows, max_length=40, packing=True, one_row=True)
    assert padded["input_ids"].shape[0] > 1 and one["input_ids"].shape == (1, sum(len(r.input_ids) for r in rows))
    one["seq_gather"], one["seq_scatter"] = packed_attention_index(one["position_ids"])
    from transformers import AttentionInterface

    from ftedge.train import model as train_model

    calls: list[bool] = []

    def spy(*args, seq_gather=None, **kwargs):  # the one-row batch reaches the attention with its indices
        calls.append(seq_gather is not None)
        return train_model.packed_attention(*args, seq_gather=seq_gather, **kwargs)

    AttentionInterface.register(train_model.PACKED_ATTENTION, spy)
    try:
        a, na, ga = _loss_and_grads(loss_module, model, padded)
        assert calls and not any(calls)
        calls.clear()
        b, nb, gb = _loss_and_grads(loss_module, model, one)
        assert calls and all(calls)
    finally:
        AttentionInterface.register(train_model.PACKED_ATTENTION, train_model.packed_attention)
    assert na == nb and b == pytest.approx(a, rel=1e-5)
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-4) for k in ga)
    assert max(float(g.abs().max()) for g in ga.values()) > 0


def test_packed_attention_is_refused_when_it_does_not_match(tiny_recipe, monkeypatch):
    """The load-time check catches an attention that lets examples see each other; the loop then
    keeps padded rows of max_length (and a model with a short sliding window is not switched)."""
    from ftedge.train import model as train_model

    recipe = load_recipe(tiny_recipe)
    real = train_model.packed_attention

    def leaky(module, query, key, value, attention_mask, dropout=0.0, scaling=None, seq_gather=None, seq_scatter=None, **kw):
        return real(module, query, key, value, None, dropout=dropout, scaling=scaling, **kw)  # one causal row: leaks

    monkeypatch.setattr(train_model, "packed_attention", leaky)
    model = train_model.load_model(recipe, recipe.base_model, torch.device("cpu"), torch.float32)
    assert train_model.causal_lm(model).config._attn_implementation != train_model.PACKED_ATTENTION
    assert not train_model.LabelOnlyLoss(model).packed_attention
    monkeypatch.setattr(train_model, "packed_attention", real)
    model = train_model.load_model(recipe, recipe.base_model, torch.device("cpu"), torch.float32)
    train_model.causal_lm(model).config.sliding_window = 16
    assert not train_model.enable_packed_attention(model, torch.float32, max_length=64)
