"""Run folders: frozen recipe, manifest stage status, atomic artifacts with sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ftedge import atomic
from ftedge.errors import FtedgeError, StageMissingError
from ftedge.manifest import Run
from ftedge.recipe import load_recipe


def test_create_freezes_recipe_and_manifest(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe, ["train.max_steps=3"])
    run = Run.create(recipe, runs_root=tmp_path / "runs")
    assert run.path.parent == (tmp_path / "runs").resolve() and run.path.name.startswith("tiny-")
    frozen = run.recipe()
    assert frozen.train.max_steps == 3 and frozen.data.train == recipe.data.train
    m = run.manifest()
    assert m["schema"] == 1 and set(m["stages"]) == {"train", "merge", "export", "bench", "ship"}
    assert all(s["status"] == "pending" for s in m["stages"].values())
    second = Run.create(recipe, runs_root=tmp_path / "runs")
    assert second.path != run.path


def test_stage_status_timings_and_failure(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    with run.stage("train") as metrics:
        assert run.stage_status("train") == "running"
        metrics["steps"] = 4
    st = run.manifest()["stages"]["train"]
    assert st["status"] == "done" and st["metrics"] == {"steps": 4} and st["seconds"] >= 0
    with pytest.raises(RuntimeError), run.stage("merge"):
        raise RuntimeError("disk on fire")
    st = run.manifest()["stages"]["merge"]
    assert st["status"] == "failed" and "disk on fire" in st["error"]
    with pytest.raises(StageMissingError, match=r"run `ftedge merge .*` first"):
        run.require("merge", "merged model", "ftedge merge")


def test_stage_queries(tiny_recipe: Path, tmp_path: Path) -> None:
    """Stages read what their predecessors recorded through Run's queries, never through the manifest's keys."""
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    pending = run.stage_record("merge")
    assert pending.status == "pending" and pending.metrics == {} and run.stage_metrics("train") == {}
    assert run.target_name() == "laptop-cpu"  # nothing exported yet: the recipe's export.target
    with run.stage("train") as metrics:
        metrics.update(steps=6, best_eval_loss=1.25)
    with pytest.raises(RuntimeError), run.stage("export") as metrics:
        metrics["target"] = "raspberry-pi-5"
        raise RuntimeError("gate crashed")
    done, failed = run.stage_record("train"), run.stage_record("export")
    assert done.status == "done" and done.seconds is not None and done.finished and done.error is None
    assert run.stage_metrics("train") == {"steps": 6, "best_eval_loss": 1.25}
    assert failed.status == "failed" and "gate crashed" in failed.error and run.target_name() == "raspberry-pi-5"
    run.stage_metrics("train")["steps"] = 99  # a copy: the manifest is written only through Run
    assert run.stage_metrics("train")["steps"] == 6 and run.stage_status("train") == "done"
    f = run.path / "merged.bin"
    f.write_bytes(b"1234")
    run.record_artifact("merged", f, stage="merge", format="hf", mode="float", source="adapter")
    merged = run.artifact("merged")
    assert merged.size_bytes == 4 and merged.mode == "float" and merged.source == "adapter" and merged.gate_passed is None


def test_record_artifact_size_and_sha(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    f = run.path / "gguf" / "m.gguf"
    atomic.write_bytes(f, b"GGUF" + b"\0" * 100)
    entry = run.record_artifact("gguf-f16", f, stage="export", format="gguf", quant="f16")
    assert entry["size_bytes"] == 104 and entry["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert entry["path"] == "gguf/m.gguf"
    assert run.artifact_path("gguf-f16") == f
    d = run.path / "onnx" / "int4"
    d.mkdir(parents=True)
    (d / "a").write_text("x")
    (d / "b").write_text("yz")
    assert run.record_artifact("onnx-int4", d, stage="export")["size_bytes"] == 3
    assert set(run.artifacts(stage="export")) == {"gguf-f16", "onnx-int4"}


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    from ftedge.errors import DiskFullError

    target = tmp_path / "out"
    with pytest.raises(DiskFullError, match=f"no space left to write {target}"), atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("partial")
        raise OSError(28, "No space left on device")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "whole").write_text("done")
    assert (target / "whole").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FtedgeError, match="not found"):
        Run.open(tmp_path / "nope")
    with pytest.raises(FtedgeError, match="not an ftedge run"):
        Run.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(FtedgeError, match="cannot be read"):
        Run.open(tmp_path)


def test_manifest_is_valid_json_after_many_updates(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    for i in range(20):
        run.update(lambda m, i=i: m.setdefault("counter", []).append(i))
    assert json.loads(run.manifest_path.read_text())["counter"] == list(range(20))


def test_atomic_files_get_the_usual_mode(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644
