"""`kill -9` of a real `ftedge train` process after a checkpoint, then `ftedge train --resume`: the resumed run
matches an uninterrupted one step for step (loss and eval loss of every step) and ends with the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftedge.manifest import Run

STEPS, SAVE_EVERY = 24, 4
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # both runs compute with the same threads


def _train(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ftedge.cli", "train", *map(str, args)]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_kill_9_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tiny_recipe: Path, tmp_path: Path) -> None:
    import torch

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["lora"]["dropout"] = 0.1  # the RNG state matters for an exact resume
    raw["train"].update(max_steps=STEPS, save_every=SAVE_EVERY, eval_every=SAVE_EVERY, lr=5e-3)
    recipe = tiny_recipe.with_name("kill.yaml")
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run(_train(recipe, "--run-dir", full), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_train(recipe, "--run-dir", cut), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = cut / "train" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
            assert proc.poll() is None, f"ftedge train ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no handler runs, nothing is flushed or recorded
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = Run.open(cut)
    assert killed.stage_status("train") == "interrupted" and str(proc.pid) in killed.manifest()["stages"]["train"]["error"]
    assert len(_records(cut)) < STEPS  # killed mid-run, not after it

    resumed = subprocess.run(_train("--resume", cut), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert Run.open(cut).is_done("train")
    a, b = _records(full), _records(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        assert ("eval_loss" in rb) == ("eval_loss" in ra) and rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), abs=1e-5)
    assert a[-1]["loss"] < a[0]["loss"]  # it learned: the comparison is not of two untrained runs
    wa, wb = _adapter(full), _adapter(cut)
    assert sorted(wa) == sorted(wb) and wa
    for name, tensor in wa.items():
        assert torch.allclose(wb[name], tensor, atol=1e-6, rtol=1e-5), name
    best = [json.loads((d / "adapter" / "ftedge-train.json").read_text()) for d in (full, cut)]
    assert best[0]["step"] == best[1]["step"]
