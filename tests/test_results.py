"""results.json's schema (ftedge.results): round trip, unknown keys and newer schemas refused in one line, old files read;
report, choose and ship read results only through it."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest

from ftedge.errors import FtedgeError
from ftedge.results import SCHEMA, BenchResults, load_results, parse_results, write_results

ROOT = Path(__file__).resolve().parents[1]
SAVED = [ROOT / "benchmarks" / "results" / n for n in ("demo-smollm2-banking77.json", "full-smollm2-banking77.json")]


def _doc() -> dict:
    entry = {"name": "gguf-q8_0", "format": "gguf", "quant": "q8_0", "path": "gguf/model-q8_0.gguf", "size_bytes": 150_000_000}
    return {
        "schema": 1,
        "ftedge_version": "0.1.0",
        "created": "2026-12-04T16:00:00Z",
        "subject": "runs/tiny",
        "target": {"name": "laptop-cpu", "threads": 4, "n_ctx": 2048, "max_size_mb": 2048, "max_ram_mb": None, "runtime": {}},
        "eval": {"task": "label_match", "n_examples": 2, "max_new_tokens": 12, "max_new_tokens_cap": None, "split": "test"},
        "speed": {"prompt_tokens": 30, "decode_tokens": 64, "repeats": 5, "warmup": 1, "greedy": True},
        "reference": "pytorch",
        "host": {"cpu": "x86", "cpus": 2, "platform": "Linux", "python": "3.11"},
        "artifacts": [
            {"name": "pytorch", "format": "torch", "quant": "f32+lora", "path": "/base", "size_bytes": 500, "status": "ok",
             "reference": True, "accuracy": 0.5, "accuracy_ci": [0.0, 1.0], "per_label": {"a": {"f1": 1.0, "support": 1}}},
            {**entry, "status": "ok", "gate_passed": True, "accuracy": 0.5, "decode_tok_s": 40.0, "phase_seconds": {"quality": 1.5}},
            {**entry, "name": "gguf-q2_k", "quant": "q2_k", "status": "failed", "error": "bench worker crashed (SIGABRT)"},
        ],
        "predictions": {"pytorch": [{"row": 0, "target": "a", "answer": "a", "correct": True}]},
    }  # fmt: skip


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    results = parse_results(_doc())
    assert results.schema_version == SCHEMA and results.entry("gguf-q8_0").gate_passed is True
    assert results.reference_entry.name == "pytorch" and results.artifacts[2].ok is False
    path = write_results(results, tmp_path / "results.json")
    on_disk = json.loads(path.read_text())
    assert on_disk["schema"] == SCHEMA and "schema_version" not in on_disk and "ship_decision" not in on_disk
    assert load_results(path) == results
    assert on_disk["artifacts"][1]["accuracy"] == 0.5 and on_disk["artifacts"][2]["error"].endswith("(SIGABRT)")


def test_unknown_keys_and_other_schemas_are_one_line(tmp_path: Path) -> None:
    bad = _doc()
    bad["artifacts"][1]["accuracy_top5"] = 0.9
    with pytest.raises(FtedgeError, match=r"unknown key 'artifacts\.1\.accuracy_top5'") as err:
        parse_results(bad, "bench/results.json")
    assert "bench/results.json" in err.value.one_line() and "\n" not in err.value.one_line()
    top = {**_doc(), "surprise": 1}
    with pytest.raises(FtedgeError, match="unknown key 'surprise'"):
        parse_results(top)
    with pytest.raises(FtedgeError, match="results schema 2 is newer than this ftedge reads"):
        parse_results({**_doc(), "schema": 2})
    with pytest.raises(FtedgeError, match="unknown results schema None"):
        parse_results({k: v for k, v in _doc().items() if k != "schema"})
    wrong = _doc()
    wrong["artifacts"][0]["status"] = "maybe"
    with pytest.raises(FtedgeError, match=r"artifacts\.0\.status"):
        parse_results(wrong)
    (tmp_path / "cut.json").write_text('{"schema": 1, "artif')
    with pytest.raises(FtedgeError, match="not valid JSON"):
        load_results(tmp_path / "cut.json")


def test_old_schema_1_files_still_read() -> None:
    """Files written before later keys were added (no intervals, gate verdicts, phases, drift): those read as None."""
    old = copy.deepcopy(_doc())
    for e in old["artifacts"]:
        for key in ("accuracy_ci", "per_label", "gate_passed", "phase_seconds"):
            e.pop(key, None)
    del old["host"], old["predictions"], old["eval"]["split"]
    results = parse_results(old)
    assert results.entry("pytorch").accuracy_ci is None and results.entry("gguf-q8_0").gate_passed is None
    assert results.eval.split is None and results.predictions is None and results.host.cpu is None
    for path in SAVED:  # results.json files saved by earlier ftedge versions, as the repository keeps them
        saved = load_results(path)
        assert saved.artifacts and saved.reference == saved.reference_entry.name


def test_a_key_that_changes_meaning_is_upgraded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook a future schema 2 uses: an older document is turned into the new shape before it is checked."""
    import ftedge.results as results_module

    def upgrade(doc: dict) -> dict:
        return {**doc, "schema": 1, "subject": doc["subject"].upper()}

    monkeypatch.setitem(results_module.UPGRADES, 0, upgrade)
    assert parse_results({**_doc(), "schema": 0}).subject == "RUNS/TINY"


def _reads_json(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.name}:{n.lineno}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("load", "loads", "read_text")
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "json"
    ]  # fmt: skip


def test_report_choose_and_ship_read_results_only_through_the_schema(tmp_path: Path, tiny_recipe: Path) -> None:
    for rel in ("ftedge/bench/report.py", "ftedge/choose.py", "ftedge/ship.py"):
        assert _reads_json(ROOT / rel) == [], rel  # no module parses results.json itself
    # report and choose take the typed results, not the JSON document
    from ftedge.bench import report
    from ftedge.choose import ship_decision
    from ftedge.targets import load_target

    results = parse_results(_doc())
    assert "| gguf-q8_0 |" in report.markdown(results)
    with pytest.raises(AttributeError):
        report.markdown(_doc())  # type: ignore[arg-type]
    assert ship_decision(results, load_target("laptop-cpu")).chosen == "gguf-q8_0"
    # ship reads the run's bench-results artifact through load_results: a key the schema lacks is refused in one line
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.ship import bench_results

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    doc = _doc()
    path = run.path / "bench" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    run.record_artifact("bench-results", path, stage="bench")
    assert isinstance(bench_results(run), BenchResults) and bench_results(run) == results
    doc["artifacts"][0]["secret_metric"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(FtedgeError, match="unknown key 'artifacts.0.secret_metric'"):
        bench_results(run)
