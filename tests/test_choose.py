"""ftedge.choose: every 'which artifact' question, with several passing candidates, and its callers going through it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from ftedge import choose
from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.recipe import load_recipe
from ftedge.targets import load_target

ROOT = Path(__file__).resolve().parents[1]


def _target(tmp_path: Path, **extra):
    raw = {"name": "edge", "gguf": {"quants": ["q4_k_m", "q8_0"]}, "onnx": {"precisions": ["int4", "fp32"]}, **extra}
    path = tmp_path / f"edge-{len(list(tmp_path.glob('edge-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_target(path)


@pytest.fixture
def run(tmp_path: Path, tiny_recipe: Path) -> Run:
    """f16 recorded first, then q8_0 and q4_k_m passing, q4_0 failed, q2_k gone from disk; two ONNX folders; merged."""
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    (run.path / "gguf").mkdir()
    for quant, passed in (("f16", True), ("q8_0", True), ("q4_0", False), ("q4_k_m", True), ("q2_k", True)):
        path = run.path / "gguf" / f"model-{quant}.gguf"
        path.write_bytes(b"GGUF" + quant.encode())
        run.record_artifact(f"gguf-{quant}", path, stage="export", format="gguf", quant=quant, gate={"passed": passed})
    (run.path / "gguf" / "model-q2_k.gguf").unlink()
    for precision in ("fp32", "int4"):
        folder = run.path / "onnx" / precision
        folder.mkdir(parents=True)
        (folder / "genai_config.json").write_text("{}")
        run.record_artifact(f"onnx-{precision}", folder, stage="export", format="onnx", quant=precision, gate={"passed": True})
    (run.path / "merged").mkdir()
    (run.path / "merged" / "config.json").write_text("{}")
    run.record_artifact("merged", run.path / "merged", stage="merge", format="hf")
    return run


def test_best_follows_the_target_not_the_recording_order(run: Run, tmp_path: Path) -> None:
    target = _target(tmp_path)
    assert choose.best(run, "gguf", target).key == "gguf-q4_k_m"  # the target's first quant, though f16 was recorded first
    assert choose.best(run, "gguf", _target(tmp_path, ship="q8_0")).key == "gguf-q8_0"  # a named ship type comes first
    assert choose.best(run, "gguf", _target(tmp_path, ship="q4_0")).key == "gguf-q4_k_m"  # ... unless it failed its gate
    assert choose.best(run, "gguf", _target(tmp_path, gguf={"quants": ["q2_k"]})).key == "gguf-f16"  # q2_k is gone: f16 next
    assert choose.best(run, "gguf").key == "gguf-f16"  # no target: the vocabulary's order, float first
    assert choose.best(run, "onnx", target).key == "onnx-int4" and choose.best(run, "onnx").key == "onnx-fp32"
    assert [a.key for a in choose.ranked(run.usable_models("gguf"), "gguf", target)] == ["gguf-q4_k_m", "gguf-q8_0", "gguf-f16"]


def test_export_modelfile_names_the_chosen_gguf(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ftedge.formats.modelfile as modelfile
    from ftedge.export.stage import _Exporter

    written: list[Path] = []

    def fake_write(gguf: Path, out: Path, **_: object) -> list[str]:
        written.append(Path(gguf))
        out.write_text(f"FROM {gguf.name}\n")
        return ["<|im_end|>"]

    monkeypatch.setattr(modelfile, "write_modelfile", fake_write)
    for target, key in ((_target(tmp_path), "gguf-q4_k_m"), (_target(tmp_path, ship="q8_0"), "gguf-q8_0")):
        exporter = object.__new__(_Exporter)  # the Modelfile step alone: no merged model to load
        exporter.run, exporter.target = run, target
        exporter.write_modelfile(run.path / "gguf")
        assert written[-1] == run.artifact_path(key) and run.artifact("modelfile").source == key


def test_ship_with_a_named_type_or_a_target_without_gguf(run: Run, tmp_path: Path) -> None:
    assert choose.ship_choice(run, _target(tmp_path), None).artifact.key == "gguf-q4_k_m"
    named = choose.ship_choice(run, _target(tmp_path, ship="q8_0"), None)
    assert named.artifact.key == "gguf-q8_0" and named.rule == "q8_0" and named.decision is None
    onnx_only = choose.ship_choice(run, _target(tmp_path, gguf=None), None)
    assert onnx_only.artifact.key == "onnx-int4" and onnx_only.artifact.format == "onnx"
    with pytest.raises(FtedgeError, match="ship: auto picks from the bench results"):
        choose.ship_choice(run, _target(tmp_path, ship="auto"), None)


def test_chat_and_serve_default_model(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftedge import serve, session

    target = _target(tmp_path)
    assert choose.default_model(run, target) == run.artifact_path("gguf-q4_k_m")
    assert choose.default_model(run) == run.artifact_path("gguf-f16")
    # chat and serve on the run folder: the run's export target (the recipe's laptop-cpu profile: q4_k_m first)
    assert session.pick_run_artifact(run) == run.artifact_path("gguf-q4_k_m")
    assert serve.resolve_artifact(run.path)[0] == run.artifact_path("gguf-q4_k_m")
    # no passing GGUF: the best ONNX folder, then the merged model
    for key in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        run.artifact_path(key).unlink()
    assert choose.default_model(run, target) == run.artifact_path("onnx-int4")
    shutil.rmtree(run.path / "onnx")
    assert choose.default_model(run, target) == run.path / "merged"
    # a ship/ bundle wins, and a folder with two models is refused
    (run.path / "ship").mkdir()
    (run.path / "ship" / "tiny.q8_0.gguf").write_bytes(b"GGUF")
    assert session.pick_run_artifact(run) == run.path / "ship" / "tiny.q8_0.gguf"
    (run.path / "ship" / "tiny.q4_k_m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FtedgeError, match="several GGUF files"):
        choose.default_model(run, target)


def test_callers_ask_choose(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """export's Modelfile, chat and serve go through choose.best / default_model / bundle_model; ship through ship_choice."""
    from ftedge import serve, session, ship
    from ftedge.export.stage import _Exporter

    calls: list[str] = []
    real_best, real_bundle = choose.best, choose.bundle_model

    def spy_best(*args, **kwargs):
        calls.append("best")
        return real_best(*args, **kwargs)

    def spy_bundle(*args, **kwargs):
        calls.append("bundle_model")
        return real_bundle(*args, **kwargs)

    monkeypatch.setattr(choose, "best", spy_best)
    monkeypatch.setattr(choose, "bundle_model", spy_bundle)
    import ftedge.formats.modelfile as modelfile

    def fake_write(gguf: Path, out: Path, **_: object) -> list[str]:
        out.write_text(f"FROM {gguf.name}\n")
        return []

    monkeypatch.setattr(modelfile, "write_modelfile", fake_write)
    exporter = object.__new__(_Exporter)
    exporter.run, exporter.target = run, _target(tmp_path)
    exporter.write_modelfile(run.path / "gguf")
    assert calls == ["best"]
    calls.clear()
    session.pick_run_artifact(run)
    assert calls[0] == "bundle_model" and "best" in calls
    calls.clear()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "m.gguf").write_bytes(b"GGUF")
    assert serve.resolve_artifact(bundle)[0] == bundle / "m.gguf" and calls == ["bundle_model"]
    assert ship.ship_choice is choose.ship_choice  # ship's one choice is choose's


def _calls(tree: ast.AST, name: str) -> int:
    return sum(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute | ast.Name)
        and getattr(n.func, "attr", getattr(n.func, "id", "")) == name
        for n in ast.walk(tree)
    )


def test_no_other_module_chooses_between_artifacts() -> None:
    """Picking among a run's usable models, or a folder's GGUFs, happens in choose.py only (manifest.py defines the query)."""
    offenders = []
    for path in sorted((ROOT / "ftedge").rglob("*.py")):
        if path.name in ("choose.py", "manifest.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if _calls(tree, "usable_models"):
            offenders.append(f"{path.relative_to(ROOT)}: usable_models()")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("*.gguf",):
                offenders.append(f"{path.relative_to(ROOT)}: glob('*.gguf')")
    assert offenders == []
