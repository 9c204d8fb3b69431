"""The README's first commands and its generated reference stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reference_is_fresh() -> None:
    res = subprocess.run([sys.executable, "-m", "ftedge.docs", "--check"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_two_commands_come_first_and_exist() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
