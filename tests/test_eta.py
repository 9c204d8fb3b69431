"""The whole-run ETA of `ftedge run`: stage work units, rates measured per machine, time left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftedge import eta
from ftedge.recipe import load_recipe
from ftedge.targets import load_target

ROOT = Path(__file__).resolve().parents[1]


def test_units_of_the_demo_follow_recipe_and_target() -> None:
    recipe = load_recipe(ROOT / "recipes" / "smollm2-banking77.yaml")
    target = load_target(recipe.export.target)
    units = eta.stage_units(recipe, target, base_gb=0.5, steps=recipe.train.max_steps)
    exported = len(target.gguf.quants) + len(target.onnx.precisions)
    assert units["train"] == recipe.train.max_steps
    assert units["export"] == pytest.approx(0.5 * exported)
    # the demo benches the artifacts it lists plus the PyTorch reference, on eval.max_examples rows
    assert units["bench"] == recipe.eval.max_examples * (len(recipe.eval.artifacts) + 1)
    everything = load_recipe(ROOT / "recipes" / "smollm2-banking77.yaml", ["eval.artifacts=null"])
    assert eta.stage_units(everything, target, base_gb=0.5, steps=1)["bench"] == everything.eval.max_examples * (exported + 2)


def test_remaining_counts_the_current_stage_and_those_not_done() -> None:
    est = {"train": 300.0, "merge": 20.0, "export": 80.0, "bench": 200.0, "ship": 2.0}
    assert eta.remaining(est, set()) == pytest.approx(602.0)
    assert eta.remaining(est, set(), "train") == pytest.approx(302.0)  # the stages after training
    assert eta.remaining(est, set(), "train", current_left=100.0) == pytest.approx(402.0)
    assert eta.remaining(est, {"merge"}, "export", current_left=80.0) == pytest.approx(282.0)
    assert eta.remaining(est, {"bench"}, "train") == pytest.approx(102.0)  # a resumed run skips what is done


def test_measured_rates_replace_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    assert eta.load_rates(path) == eta.REFERENCE
    eta.record("train", 600.0, 150, path)  # 4 s a step on this machine
    assert eta.load_rates(path)["train"] == pytest.approx(4.0)
    assert eta.load_rates(path)["bench"] == eta.REFERENCE["bench"]
    eta.record("train", 300.0, 150, path)  # later runs move the rate towards what they measure
    assert eta.load_rates(path)["train"] == pytest.approx(eta.KEEP * 4.0 + (1 - eta.KEEP) * 2.0)
    eta.record("train", 0.0, 0, path)  # nothing measured: unchanged
    assert eta.load_rates(path)["train"] == pytest.approx(3.0)
    path.write_text("{not json")
    assert eta.load_rates(path) == eta.REFERENCE


def test_estimate_after_a_measured_run_predicts_a_like_run(tmp_path: Path) -> None:
    """Stage times of one run (as measured), recorded, give the next run with the same units the same total;
    a run with twice the steps and rows gets the longer stages scaled, not the reference guesses."""
    path = tmp_path / "rates.json"
    recipe = load_recipe(ROOT / "recipes" / "smollm2-banking77.yaml")
    target = load_target(recipe.export.target)
    units = eta.stage_units(recipe, target, base_gb=0.54, steps=150)
    measured = {"train": 700.0, "merge": 25.0, "export": 90.0, "bench": 150.0, "ship": 1.5}
    for stage, seconds in measured.items():
        eta.record(stage, seconds, units[stage], path)
    again = eta.estimate(units, eta.load_rates(path))
    assert sum(again.values()) == pytest.approx(sum(measured.values()))
    bigger = eta.stage_units(
        load_recipe(ROOT / "recipes" / "smollm2-banking77.yaml", ["eval.max_examples=400"]), target, base_gb=0.54, steps=300
    )
    est = eta.estimate(bigger, eta.load_rates(path))
    assert est["train"] == pytest.approx(1400.0) and est["bench"] == pytest.approx(300.0) and est["merge"] == pytest.approx(25.0)


def test_run_eta_on_the_training_bar() -> None:
    from ftedge.train.loop import run_eta

    assert run_eta(10, None, 60.0) == "run ETA -:--:--"  # no step measured yet
    assert run_eta(100, 2.5, 110.0) == "run ETA 0:06:00"  # 250 s of steps + 110 s of later stages
    assert run_eta(0, 2.5, 0.0) == "run ETA 0:00:00"
    assert eta.clock(3723.4) == "1:02:03"


def test_rates_file_keeps_what_was_measured(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "rates.json"
    eta.record("merge", 10.0, 0.5, path)
    saved = json.loads(path.read_text())
    assert saved == {"merge": pytest.approx(20.0)}  # only what this machine measured
