"""`ftedge run` end to end on the tiny model: every stage, the ship/ bundle, and --resume."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from ftedge.cli import main
from ftedge.manifest import Run


def _gguf_only_target(tmp_path: Path) -> Path:
    target = {
        "name": "tiny-cpu",
        "gguf": {"quants": ["q8_0"]},
        "onnx": None,
        "n_ctx": 256,
        "threads": 1,
        "ship": "q8_0",  # a 4-step random tiny model has near-tied logits: the built-in gates judge it by KL (issue 17)
    }
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(target))
    return path


def test_run_end_to_end_then_resume(tiny_recipe: Path, tmp_path: Path) -> None:
    target = _gguf_only_target(tmp_path)
    run_dir = tmp_path / "runs" / "e2e"
    cli = CliRunner()
    res = cli.invoke(
        main,
        # drift from base is tested on the bench's own run (tests/test_bench.py); here it would only add a worker
        [
            "run",
            str(tiny_recipe),
            "-o",
            f"export.target={target}",
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
    manifest = run.manifest()
    assert all(manifest["stages"][s]["status"] == "done" for s in ("train", "merge", "export", "bench")), manifest["stages"]
    assert {"adapter", "merged", "gguf-f16", "gguf-q8_0", "ship"} <= set(manifest["artifacts"])

    ship = run_dir / "ship"
    files = sorted(p.name for p in ship.iterdir())
    assert files == ["Modelfile", "README.md", "tiny.q8_0.gguf"]
    assert (ship / "tiny.q8_0.gguf").read_bytes() == run.artifact_path("gguf-q8_0").read_bytes()
    bundle_text = (ship / "README.md").read_text() + (ship / "Modelfile").read_text()
    assert str(run_dir) not in bundle_text and ".venv" not in bundle_text  # the bundle stands alone
    assert "FROM ./tiny.q8_0.gguf" in (ship / "Modelfile").read_text()
    card = (ship / "README.md").read_text()
    assert card.startswith("---\nlicense: unknown\n") and "## Evaluation" in card and "**gguf-q8_0 (shipped)**" in card
    assert "The target profile names the quant to ship (`ship: q8_0`)." in card

    results = json.loads((run_dir / "bench" / "results.json").read_text())
    assert results["schema"] == 1 and {"merged", "gguf-q8_0"} <= {e["name"] for e in results["artifacts"]}
    # the whole-run ETA of the next run uses this machine's pace, measured per stage
    from ftedge import eta

    rates = json.loads(eta.rates_path().read_text())
    assert set(eta.STAGES) <= set(rates) and all(v > 0 for v in rates.values())

    # Simulate a crash during bench: the stage is left unfinished; --resume finishes only that.
    run.update(lambda m: m["stages"]["bench"].update(status="failed", error="killed"))
    train_finished = manifest["stages"]["train"]["finished"]
    res = cli.invoke(main, ["run", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    after = run.manifest()
    assert after["stages"]["bench"]["status"] == "done"
    assert after["stages"]["train"]["finished"] == train_finished  # not retrained
