"""The ruff rules the project keeps (pyproject.toml: E, F, I, UP, B, W at line length 140) and its formatting are enforced in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ["ftedge", "tests", "benchmarks", "setup.py"]


def test_ruff_check_is_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_is_applied() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, "run `ruff format ftedge tests benchmarks`:\n" + res.stdout + res.stderr
