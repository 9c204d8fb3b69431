"""benchmarks/gpu_check.sh stays runnable: its CPU dry run (tiny models, 3 steps) goes through the same
stages as the GPU check, and the CUDA tests' bodies run on the CPU (slow)."""

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
    tests = doc["cuda_tests"]
    assert tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] >= 7  # every CUDA test was collected (skipped without a GPU)
    trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    for size, bench in doc["bench"].items():
        assert "error" not in bench, (size, bench)
        results = bench["results"]
        assert set(results) == ({"ftedge", "ftedge-gc", "trl"} if trl else {"ftedge", "ftedge-gc"})
        for kind, r in results.items():
            assert r["steps"] == 3 and r["tokens"] > 0 and r["useful_tok_s"] > 0 and math.isfinite(r["eval_loss"]), kind
            assert r["steady_tok_s"] and r["steady_tokens"] < r["tokens"], kind  # the warm-up step is left out
        if trl:
            assert results["trl"]["tokens"] == results["ftedge"]["tokens"]  # the same rows
            assert set(bench["ratio"]) == {"ftedge/trl", "ftedge-gc/trl"} and set(doc["verdict"][size]) == {"ftedge", "ftedge-gc"}
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "DRY RUN" in text and "tiny-b" in text and (tmp_path / "cuda_tests.log").is_file()


@pytest.mark.slow
def test_cuda_test_bodies_run_on_cpu():
    env = {**os.environ, "FTEDGE_CUDA_TESTS_ON_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "6 passed, 1 skipped" in res.stdout  # fp16 compute is CUDA-only
