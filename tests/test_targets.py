"""Target profiles: shipped ones load; bad ones fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftedge.errors import FtedgeError
from ftedge.targets import available_targets, load_target


def test_shipped_profiles_load() -> None:
    assert {"laptop-cpu", "raspberry-pi-5"} <= set(available_targets())
    laptop = load_target("laptop-cpu")
    assert laptop.gguf and {"q4_k_m", "q8_0"} <= set(laptop.gguf.quants)
    assert laptop.onnx and "int4" in laptop.onnx.precisions
    pi = load_target("raspberry-pi-5")
    assert pi.onnx is None and pi.threads == 4


def test_unknown_target_lists_choices() -> None:
    with pytest.raises(FtedgeError, match="unknown target 'toaster'.*laptop-cpu"):
        load_target("toaster")


def test_unknown_quant_type(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("name: t\ngguf: {quants: [q4_k_m, q9_z]}\n")
    with pytest.raises(FtedgeError, match="unknown quant type 'q9_z'"):
        load_target(p)


def test_unknown_key_in_profile(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("name: t\nthreadz: 4\n")
    with pytest.raises(FtedgeError, match="threadz"):
        load_target(p)
