"""benchmarks/gpu_check.sh stays runnable: its CPU dry run (tiny models, 3 steps, the CUDA tests' bodies on
the CPU) goes through the same stages as the GPU check; the CUDA tests' bodies also run on their own (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cuda_test_ids() -> list[str]:
    """The ids `pytest -m cuda tests/test_cuda.py` collects (what the GPU check runs)."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line.split("::", 1)[1] for line in res.stdout.splitlines() if line.startswith("tests/test_cuda.py::")]
    assert res.returncode == 0 and ids, res.stdout[-2000:] + res.stderr[-2000:]
    return ids


def _junit_outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """test name -> (passed / failed / error / skipped, message) from a JUnit XML file."""
    import xml.etree.ElementTree as ET

    names = {"failure": "failed", "error": "error", "skipped": "skipped"}
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag: child.get("message", "") for child in case}
        kind = next((k for k in names if k in kinds), None)
        out[case.get("name", "?")] = (names.get(kind, "passed"), kinds.get(kind, ""))
    return out


def test_gpu_check_dry_run(tmp_path, tokenizer_dir):
    # the session's tokenizer (reading it from the GGUF again would cost ~20 s)
    env = {**os.environ, "PYTHON": sys.executable, "FTEDGE_TEST_TOKENIZER": str(tokenizer_dir)}
    env.pop("OUT", None)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] and doc["sizes"] == ["tiny-a", "tiny-b"] and doc["environment"]["torch"]
    # the CUDA tests' bodies ran on the CPU and passed, all but fp16 compute (CUDA-only: skipped, saying so)
    tests = doc["cuda_tests"]
    collected = _cuda_test_ids()
    cuda_only = [name for name in collected if name.endswith("[float16]")]
    assert tests["on_cpu"] and tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0, tests
    assert tests["passed"] == len(collected) - len(cuda_only) and tests["skipped"] == len(cuda_only), tests
    trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    for size, bench in doc["bench"].items():
        assert "error" not in bench, (size, bench)
        results = bench["results"]
        assert set(results) == ({"ftedge", "ftedge-gc", "trl"} if trl else {"ftedge", "ftedge-gc"})
        for kind, r in results.items():
            assert r["steps"] == 3 and r["tokens"] > 0 and r["useful_tok_s"] > 0 and math.isfinite(r["eval_loss"]), kind
            assert r["steady_tok_s"] and r["steady_tokens"] < r["tokens"], kind  # the warm-up step is left out
        # what the CPU can check for real: gradient checkpointing recomputes activations, it must not change the training
        ftedge, gc = results["ftedge"], results["ftedge-gc"]
        assert gc["tokens"] == ftedge["tokens"], size
        assert gc["last_train_loss"] == pytest.approx(ftedge["last_train_loss"], abs=1e-4), size
        assert gc["eval_loss"] == pytest.approx(ftedge["eval_loss"], abs=1e-4), size
        if trl:
            assert results["trl"]["tokens"] == results["ftedge"]["tokens"]  # the same rows
            assert set(bench["ratio"]) == {"ftedge/trl", "ftedge-gc/trl"} and set(doc["verdict"][size]) == {"ftedge", "ftedge-gc"}
            # the same LoRA on the same rows: TRL's model ends where ftedge's does (3 steps from a random model: ~0.005 nats apart)
            assert abs(bench["ratio"]["ftedge/trl"]["eval_loss_delta"]) < 0.05, bench["ratio"]
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "DRY RUN" in text and "tiny-b" in text and (tmp_path / "cuda_tests.log").is_file()


@pytest.mark.slow
def test_cuda_test_bodies_run_on_cpu(tmp_path):
    """Every CUDA test body runs on the CPU and passes, except those that say the CPU cannot run them (fp16 compute)."""
    env = {**os.environ, "FTEDGE_CUDA_TESTS_ON_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    junit = tmp_path / "cuda.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    outcomes = _junit_outcomes(junit)
    collected = _cuda_test_ids()
    assert sorted(outcomes) == sorted(collected)  # each collected test ran once
    skipped = {name: msg for name, (kind, msg) in outcomes.items() if kind == "skipped"}
    assert all("CUDA-only" in msg for msg in skipped.values()), skipped  # only what the CPU cannot do, and it says so
    assert sorted(skipped) == sorted(name for name in collected if name.endswith("[float16]"))  # fp16 compute, nothing else
    assert all(kind == "passed" for name, (kind, _) in outcomes.items() if name not in skipped), outcomes
