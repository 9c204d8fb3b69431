"""Export stage: GGUF artifacts gated and recorded, failures named, idempotence, missing inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from export_helpers import make_adapter, make_run, tiny_target, trained_tiny_model

from ftedge.errors import FtedgeError, GateFailedError, StageMissingError


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    base = trained_tiny_model(root / "base", tokenizer_dir)
    return base, make_adapter(base, root / "adapter")


def _merged_run(tmp_path: Path, base_and_adapter):
    from ftedge.merge import merge_stage

    run = make_run(tmp_path, *base_and_adapter)
    merge_stage(run)
    return run


def test_export_without_merge_is_refused(tmp_path: Path, base_and_adapter) -> None:
    from ftedge.export import export_stage

    run = make_run(tmp_path, *base_and_adapter)
    with pytest.raises(StageMissingError, match="ftedge merge"):
        export_stage(run, tiny_target(tmp_path, ["q8_0"]))
    assert run.stage_status("export") == "pending"


def test_export_gates_and_records_every_artifact(tmp_path: Path, base_and_adapter) -> None:
    from ftedge.export import export_stage

    run = _merged_run(tmp_path, base_and_adapter)
    target = tiny_target(tmp_path, ["q8_0", "q4_0"])
    export_stage(run, target)
    arts = run.artifacts(stage="export")
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_0", "modelfile"} <= set(arts)
    for key in ("gguf-f16", "gguf-q8_0", "gguf-q4_0"):
        entry = arts[key]
        assert entry["format"] == "gguf" and entry["status"] == "passed"
        gate = entry["gate"]
        assert gate["passed"] and gate["n_prompts"] > 0
        assert {"top1", "kl", "thresholds", "tokenizer", "stop"} <= set(gate)
        assert (run.path / entry["path"]).is_file()
    assert arts["gguf-q8_0"]["quant"] == "q8_0"
    modelfile = (run.path / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf")
    stage = run.manifest()["stages"]["export"]
    assert stage["status"] == "done" and stage["metrics"]["artifacts"]["gguf-q4_0"]["status"] == "passed"

    # idempotent: nothing is rebuilt
    recorded = {k: v["recorded"] for k, v in run.artifacts(stage="export").items() if k.startswith("gguf-")}
    export_stage(run, target)
    assert {k: v["recorded"] for k, v in run.artifacts(stage="export").items() if k.startswith("gguf-")} == recorded


def test_failing_gate_is_recorded_and_named(tmp_path: Path, base_and_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftedge.export import export_stage

    run = _merged_run(tmp_path, base_and_adapter)
    # an impossible gate for q4_0 (no 4-bit model has zero KL); and no ONNX exporter available
    monkeypatch.setitem(sys.modules, "ftedge.export.onnx", None)
    target = tiny_target(tmp_path, ["q4_0"], gates={"q4_0": {"min_top1": 1.0, "max_kl": 0.0}}, onnx=["int4"])
    with pytest.raises(GateFailedError) as info:
        export_stage(run, target)
    msg = str(info.value)
    assert "gguf-q4_0" in msg and "onnx-int4" in msg and "\n" not in msg
    assert info.value.exit_code == 3
    arts = run.artifacts(stage="export")
    assert arts["gguf-f16"]["status"] == "passed"
    failed = arts["gguf-q4_0"]
    assert failed["status"] == "failed" and not failed["gate"]["passed"]
    assert failed["gate"]["kl"] > 0 and failed["gate"]["thresholds"] == {"min_top1": 1.0, "max_kl": 0.0}
    assert "onnx-int4" not in arts
    assert run.stage_status("export") == "failed"


def test_unknown_quant_type_in_target(tmp_path: Path) -> None:
    with pytest.raises(FtedgeError, match="unknown quant type"):
        tiny_target(tmp_path, ["q7_x"])
