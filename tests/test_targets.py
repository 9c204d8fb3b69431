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


def test_schema_accepts_exactly_what_the_exporters_build(tmp_path: Path) -> None:
    """ONNX fp16 (no builder CPU build) fails when the profile loads; int4-rtn, which the exporter builds, loads."""
    from ftedge.formats.quants import GGUF_TYPES, ONNX_PRECISIONS

    p = tmp_path / "t.yaml"
    p.write_text("name: t\nonnx: {precisions: [int4, fp16]}\n")
    with pytest.raises(FtedgeError, match="onnx.precisions.1: unknown quant type 'fp16'"):
        load_target(p)
    p.write_text(
        f"name: t\ngguf: {{quants: [{', '.join(GGUF_TYPES)}]}}\nonnx: {{precisions: [{', '.join(ONNX_PRECISIONS)}]}}\nship: Q4_K_M\n"
    )
    target = load_target(p)
    assert target.gguf.quants == list(GGUF_TYPES) and target.onnx.precisions == list(ONNX_PRECISIONS) and target.ship == "q4_k_m"
    p.write_text("name: t\ngates: {q4_k_m: {min_top1_confident: 0.8, max_kl: 0.3}, q5_x: {max_kl: 0.3}}\n")
    with pytest.raises(FtedgeError, match="unknown quant type 'q5_x'"):
        load_target(p)


def test_quant_vocabulary_is_gguf_pys_and_llama_cpps() -> None:
    """Every GGUF type maps to gguf-py's LlamaFileType and to the same llama.cpp ftype; every type has a default gate."""
    import gguf
    import llama_cpp

    from ftedge.formats.quants import DEFAULT_GATES, GGUF_TYPES, ONNX_PRECISIONS, gguf_file_type, gguf_type_name

    for q in GGUF_TYPES:
        number = gguf_file_type(q)
        member = gguf.LlamaFileType(number).name
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{member}") == number, q
        assert gguf_type_name(number) == q
    assert set(DEFAULT_GATES) == set(GGUF_TYPES) | set(ONNX_PRECISIONS)
    assert gguf_type_name(9999) is None
