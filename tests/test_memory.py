"""Peak RSS must be the process's own, not inherited from a big parent (bench workers)."""

from __future__ import annotations

import json
import subprocess
import sys

from ftedge.memory import peak_rss_mb

CHILD = "import json; from ftedge.memory import peak_rss_mb; print(json.dumps(peak_rss_mb()))"


def test_child_does_not_inherit_parent_peak() -> None:
    block = bytearray(600 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_mb() > 600
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    child = json.loads(out)
    del block
    assert 5 < child < 300, f"child peak {child:.0f} MB looks inherited from the parent"
