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


# -- ship: auto --------------------------------------------------------------------------------
MB = 1024 * 1024


def _entry(name: str, fmt: str, size_mb: float, *, reference: bool = False, **figures) -> dict:
    quant = name.split("-", 1)[-1]
    return {"name": name, "format": fmt, "quant": quant, "size_bytes": int(size_mb * MB), "status": "ok", "reference": reference, **figures}


def _target(tmp_path: Path, **extra) -> object:
    import yaml

    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"name": "edge", "max_size_mb": 200, "max_ram_mb": 400, "ship": "auto", **extra}))
    return load_target(p)


def _doc(*entries: dict) -> dict:
    return {"schema": 1, "reference": next(e["name"] for e in entries if e.get("reference")), "artifacts": list(entries)}


def _typed(doc: dict):
    """The bench results a test document stands for, read through the schema as ship and bench read them."""
    from ftedge.results import parse_results

    where = {
        "ftedge_version": "0",
        "created": "2026-01-01T00:00:00Z",
        "subject": "run",
        "target": {"name": "edge", "threads": 2, "n_ctx": 512},
    }
    full = {**where, "eval": {}, "speed": {"decode_tokens": 8, "repeats": 1, "warmup": 0}, **doc}
    full["artifacts"] = [{"path": e["name"], **e} for e in doc["artifacts"]]
    return parse_results(full)


def test_ship_auto_takes_the_smallest_gguf_within_tolerance_that_fits_and_passed(tmp_path: Path) -> None:
    from ftedge.choose import ship_decision

    doc = _doc(
        _entry("pytorch", "torch", 300, reference=True, accuracy=0.80, accuracy_ci=[0.76, 0.84]),  # +-4 points
        _entry("merged", "hf", 260, accuracy=0.80),
        _entry("gguf-f16", "gguf", 250, accuracy=0.80, peak_rss_mb=300),  # too large for 200 MB
        _entry("gguf-q8_0", "gguf", 140, accuracy=0.79, peak_rss_mb=250),
        _entry("gguf-q5_k_m", "gguf", 110, accuracy=0.772, peak_rss_mb=230),  # 2.8 points down: within 4
        _entry("gguf-q4_k_m", "gguf", 100, accuracy=0.75, peak_rss_mb=220),  # 5 points down
        _entry("gguf-q4_0", "gguf", 90, accuracy=0.79, peak_rss_mb=210, gate_passed=False),
        _entry("gguf-q3_k_m", "gguf", 80, accuracy=0.79, peak_rss_mb=500),  # over max_ram_mb
        _entry("onnx-int4", "onnx", 70, accuracy=0.80),
    )
    d = ship_decision(_typed(doc), _target(tmp_path))
    verdicts = {c.name: (c.verdict, c.reason) for c in d.candidates}
    assert d.chosen == "gguf-q5_k_m" and d.within_tolerance and d.metric == "accuracy" and d.tolerance == pytest.approx(4.0)
    assert verdicts["gguf-q8_0"][0] == "qualifies" and "larger than gguf-q5_k_m" in verdicts["gguf-q8_0"][1]
    assert verdicts["gguf-q4_k_m"] == ("rejected", "accuracy 75.0%: 5.00 points worse than the reference (tolerance 4.00 points)")
    assert verdicts["gguf-f16"][1].startswith("too large for edge: 250.0 MB > max_size_mb 200")
    assert verdicts["gguf-q4_0"][1] == "failed its parity gate at export"
    assert "peak RSS 500 MB > max_ram_mb 400" in verdicts["gguf-q3_k_m"][1]
    assert verdicts["onnx-int4"][0] == "rejected" and "ONNX" in verdicts["onnx-int4"][1]
    assert verdicts["pytorch"][0] == "reference" and verdicts["merged"][0] == "rejected"
    assert "gguf-q5_k_m" in d.summary and "4.00 points" in d.summary
    # a narrow interval: the tolerance is 1 point, so 2.8 points down is too much
    doc["artifacts"][0]["accuracy_ci"] = [0.795, 0.805]
    narrow = ship_decision(_typed(doc), _target(tmp_path))
    assert narrow.chosen == "gguf-q8_0" and narrow.within_tolerance and narrow.tolerance == 1.0  # exactly 1 point down
    # the target's own tolerance wins; an artifact the run no longer has is skipped
    assert ship_decision(_typed(doc), _target(tmp_path, ship_tolerance=6)).chosen == "gguf-q4_k_m"
    assert ship_decision(_typed(doc), _target(tmp_path, ship_tolerance=6), available={"gguf-q8_0"}).chosen == "gguf-q8_0"


def test_ship_auto_on_perplexity_and_when_nothing_is_close_enough(tmp_path: Path) -> None:
    from ftedge.choose import decision_markdown, ship_decision

    doc = _doc(
        _entry("pytorch", "torch", 300, reference=True, perplexity=10.0, perplexity_ci=[9.95, 10.05], chrf=40.0),
        _entry("gguf-q8_0", "gguf", 140, perplexity=10.05, chrf=39.0),
        _entry("gguf-q4_k_m", "gguf", 100, perplexity=10.6, chrf=41.0),
    )
    d = ship_decision(_typed(doc), _target(tmp_path))
    assert d.metric == "perplexity" and d.unit == "%" and d.tolerance == 1.0 and d.chosen == "gguf-q8_0"
    assert ship_decision(_typed(doc), _target(tmp_path, ship_metric="chrf")).chosen == "gguf-q4_k_m"  # 1 point better
    doc["artifacts"][1]["perplexity"] = 11.0
    d = ship_decision(_typed(doc), _target(tmp_path))
    assert d.chosen == "gguf-q4_k_m" and not d.within_tolerance and "no GGUF within 1.00%" in d.summary
    lines = decision_markdown(d)
    assert lines[0] == d.summary + "." and sum(line.startswith("| gguf-") for line in lines) == 2
    nothing = ship_decision(_typed(_doc(_entry("pytorch", "torch", 300, reference=True, perplexity=10.0))), _target(tmp_path))
    assert nothing.chosen is None and "no GGUF" in nothing.summary


def test_shipped_profiles_ship_auto_and_bad_ship_values_list_auto(tmp_path: Path) -> None:
    assert load_target("laptop-cpu").ship == "auto" and load_target("raspberry-pi-5").ship == "auto"
    p = tmp_path / "t.yaml"
    p.write_text("name: t\nship: smallest\n")
    with pytest.raises(FtedgeError, match="unknown quant type 'smallest'.*auto"):
        load_target(p)
