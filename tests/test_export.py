"""Export stage: GGUF artifacts gated and recorded, failures named, idempotence, missing inputs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from helpers import make_run, tiny_target

from ftedge.errors import FtedgeError, GateFailedError, StageMissingError, from_os_error


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
        assert {"top1", "kl", "kl_p99", "top1_confident", "thresholds", "tokenizer", "stop", "runtime"} <= set(gate)
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
    import ftedge.export.onnx
    from ftedge.export import export_stage

    run = _merged_run(tmp_path, base_and_adapter)

    # an impossible gate for q4_0 (no 4-bit model has zero KL); and an ONNX build that fails
    def broken_builder(*args, **kwargs):
        raise FtedgeError("ONNX builder failed on merged (int4): unsupported op")

    monkeypatch.setattr(ftedge.export.onnx, "export_onnx", broken_builder)
    target = tiny_target(tmp_path, ["q4_0"], gates={"q4_0": {"min_top1_confident": 1.0, "max_kl": 0.0, "max_kl_p99": 0.0}}, onnx=["int4"])
    with pytest.raises(GateFailedError) as info:
        export_stage(run, target)
    msg = str(info.value)
    assert "gguf-q4_0" in msg and "onnx-int4" in msg and "\n" not in msg
    assert info.value.exit_code == 3
    arts = run.artifacts(stage="export")
    assert arts["gguf-f16"]["status"] == "passed"
    failed = arts["gguf-q4_0"]
    assert failed["status"] == "failed" and not failed["gate"]["passed"]
    assert failed["gate"]["kl"] > 0 and failed["gate"]["thresholds"] == {"min_top1_confident": 1.0, "max_kl": 0.0, "max_kl_p99": 0.0}
    assert "onnx-int4" not in arts
    assert run.stage_status("export") == "failed"


def test_unknown_quant_type_in_target(tmp_path: Path) -> None:
    with pytest.raises(FtedgeError, match="unknown quant type"):
        tiny_target(tmp_path, ["q7_x"])


def test_a_full_disk_stops_the_export_with_a_typed_error(tmp_path: Path, base_and_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """No space left while quantizing: DiskFullError stops the stage; nothing after it is attempted."""
    import ftedge.export.gguf
    import ftedge.export.onnx
    from ftedge.errors import DiskFullError
    from ftedge.export import export_stage

    run = _merged_run(tmp_path, base_and_adapter)

    def no_space(*args, **kwargs):
        raise from_os_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "model-q8_0.gguf")

    attempted: list[str] = []
    monkeypatch.setattr(ftedge.export.gguf, "quantize_gguf", no_space)
    monkeypatch.setattr(ftedge.export.onnx, "export_onnx", lambda *a, **k: attempted.append("onnx"))
    with pytest.raises(DiskFullError, match="no space left"):
        export_stage(run, tiny_target(tmp_path, ["q8_0", "q4_0"], onnx=["fp32"]))
    arts = run.artifacts(stage="export")
    assert "gguf-q8_0" not in arts and "gguf-q4_0" not in arts and attempted == []
    assert run.stage_status("export") == "failed"


def test_os_errors_become_one_line_errors_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    """An OSError inside the atomic rename of a conversion is typed by its errno, not by its text."""
    import os

    from ftedge.errors import DiskFullError
    from ftedge.export.gguf import convert_to_gguf

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".gguf"):
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "tiny.gguf"
    for code, kind, words in (
        (errno.ENOSPC, DiskFullError, "no space left"),
        (errno.EROFS, FtedgeError, "read-only"),
        (errno.EACCES, FtedgeError, "permission denied"),
    ):
        with pytest.raises(kind, match=words) as info:
            convert_to_gguf(tiny_model_dir, out, outtype="f16")
        assert str(out) in str(info.value) and "\n" not in str(info.value)
        assert (code == errno.ENOSPC) == isinstance(info.value, DiskFullError)
        assert not out.exists()


def test_export_refuses_when_the_data_file_changed_since_training(tmp_path: Path, base_and_adapter) -> None:
    """Gate prompts and GPTQ calibration rows come from the splits frozen at train time: a changed data file is refused."""
    from ftedge.export import export_stage

    run = _merged_run(tmp_path, base_and_adapter)
    data = tmp_path / "train.csv"
    data.write_text("\n".join(data.read_text().splitlines()[:-5]) + "\n")  # five rows removed
    with pytest.raises(FtedgeError) as err:
        export_stage(run, tiny_target(tmp_path, ["q8_0"]))
    msg = str(err.value)
    assert "\n" not in msg and f"data file {data} changed since run {run.path} was trained: 5 of the " in msg
    assert run.stage_status("export") == "pending" and not (run.path / "gguf").exists()
