"""The CLI contract: commands, flags, help, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ftedge import __version__
from ftedge.cli import main

COMMANDS = ["validate", "train", "merge", "export", "bench", "run", "ship", "chat"]


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def test_version(cli: CliRunner) -> None:
    res = cli.invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(cli: CliRunner, command: str) -> None:
    res = cli.invoke(main, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output and f"ftedge {command}" in res.output


def test_contract_flags(cli: CliRunner) -> None:
    helps = {c: cli.invoke(main, [c, "--help"]).output for c in COMMANDS}
    assert "-o, --override" in helps["train"] and "--run-dir" in helps["train"] and "--resume" in helps["train"]
    assert "--target" in helps["export"]
    assert "--target" in helps["bench"] and "--json" in helps["bench"]
    assert "-o, --override" in helps["run"] and "--resume" in helps["run"]
    assert "--prompt" in helps["chat"]


def test_validate_good_recipe(cli: CliRunner, tiny_recipe: Path) -> None:
    res = cli.invoke(main, ["validate", str(tiny_recipe)])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output and "LlamaForCausalLM" in res.output


def test_validate_explain_lists_keys(cli: CliRunner) -> None:
    res = cli.invoke(main, ["validate", "--explain"])
    assert res.exit_code == 0
    for key in ("data.train", "train.max_steps", "adapter.target_modules", "eval.task"):
        assert key in res.output


def _bad_recipe(tiny_recipe: Path) -> Path:
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"]["max_stepz"] = 3
    tiny_recipe.write_text(yaml.safe_dump(raw))
    return tiny_recipe


def test_bad_recipe_is_one_line_exit_2(tiny_recipe: Path) -> None:
    """Through the real console entry point: one stderr line, exit 2, no traceback."""
    bad = _bad_recipe(tiny_recipe)
    for cmd in (["validate", str(bad)], ["train", str(bad)], ["run", str(bad)]):
        res = subprocess.run([sys.executable, "-m", "ftedge.cli", *cmd], capture_output=True, text=True)
        assert res.returncode == 2, (cmd, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "unknown key 'train.max_stepz'" in lines[0], res.stderr
        assert "Traceback" not in res.stderr


def test_debug_shows_traceback(tiny_recipe: Path) -> None:
    bad = _bad_recipe(tiny_recipe)
    res = subprocess.run([sys.executable, "-m", "ftedge.cli", "--debug", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_override_reaches_the_recipe(cli: CliRunner, tiny_recipe: Path) -> None:
    res = cli.invoke(main, ["validate", str(tiny_recipe), "-o", "data.format=tsv"])
    assert res.exit_code == 2 and "data.format" in res.output


@pytest.mark.parametrize("command", ["merge", "export", "bench", "ship"])
def test_stage_on_missing_run(cli: CliRunner, tmp_path: Path, command: str) -> None:
    res = cli.invoke(main, [command, str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "not found" in res.output


def test_merge_before_train_is_actionable(cli: CliRunner, tiny_recipe: Path, tmp_path: Path) -> None:
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    res = cli.invoke(main, ["merge", str(run.path)])
    assert res.exit_code == 2
    assert "ftedge train" in res.output


def test_resume_refuses_new_recipe(cli: CliRunner, tiny_recipe: Path, tmp_path: Path) -> None:
    res = cli.invoke(main, ["run", str(tiny_recipe), "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "--resume" in res.output


def test_validate_rejects_a_precision_no_exporter_builds(cli: CliRunner, tiny_recipe: Path, tmp_path: Path) -> None:
    """A target asking for ONNX fp16 fails at `ftedge validate`, in one line, before any training."""
    target = tmp_path / "fp16.yaml"
    target.write_text("name: fp16\ngguf: null\nonnx: {precisions: [fp16]}\n")
    res = cli.invoke(main, ["validate", str(tiny_recipe), "-o", f"export.target={target}"])
    assert res.exit_code == 2
    assert "unknown quant type 'fp16'" in res.output and "int4-rtn" in res.output


def test_a_log_file_gets_no_progress_bars(tiny_model_dir: Path) -> None:
    """Loading a model with the CLI's logging set up and stderr going to a file (a bench worker, `ftedge run > log`):
    no tqdm bar ("Loading weights ...") in the file; the same load without the set-up does write one."""
    load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})"
    setup = "from ftedge.logs import setup_logging; setup_logging(False); "
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for code in (load, setup + load)]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert "Loading weights" in outs[0].stderr  # the check can fail
    assert "Loading weights" not in outs[1].stderr and "it/s" not in outs[1].stderr, outs[1].stderr
