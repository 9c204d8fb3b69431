"""The laptop-cpu target end to end (export/laptop-cpu.yaml: q4_k_m, q8_0, int4, `ship: auto`): `ftedge run` on the
confident tiny model, then `ftedge serve` on the ship/ bundle answers what bench's predictions.json says.

~45 s on an idle 2-core machine (train, merge, three exports with int4's GPTQ, four benched artifacts, a server),
~160 s when the machine is shared: in the default suite."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from click.testing import CliRunner
from helpers import ROWS, SYSTEM, start_serve_cli

from ftedge.cli import main
from ftedge.manifest import Run


def _recipe(tmp_path: Path, base: Path) -> Path:
    rng = random.Random(0)
    data = tmp_path / "train.csv"
    lines = ["text,category"] + [f"{t}{rng.choice(['', '?', ' please', '!'])},{label}" for t, label in ROWS * 6]
    data.write_text("\n".join(lines) + "\n")
    recipe = {
        "name": "laptop",
        "base_model": str(base),
        "data": {"train": data.name, "format": "text_label", "text_field": "text", "label_field": "category",
                 "system_prompt": SYSTEM, "val_fraction": 0.2, "test_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 4, "lr": 1.0e-4, "max_length": 64},
        "export": {"target": "laptop-cpu"},
        "eval": {"task": "label_match", "max_examples": 6, "drift": False},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_laptop_cpu_end_to_end_and_serve_answers_as_bench(tmp_path: Path, confident_model_dir: Path) -> None:
    from openai import OpenAI

    from ftedge.bench import stage as bench

    run_dir = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, confident_model_dir)), "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    run = Run.open(run_dir)
    manifest = run.manifest()
    assert all(manifest["stages"][s]["status"] == "done" for s in ("train", "merge", "export", "bench")), manifest["stages"]
    assert {"gguf-q4_k_m", "gguf-q8_0", "onnx-int4", "ship"} <= set(manifest["artifacts"])
    for key in ("gguf-q4_k_m", "gguf-q8_0", "onnx-int4"):  # each gated at export, and it passed
        assert manifest["artifacts"][key]["gate"]["passed"], (key, manifest["artifacts"][key]["gate"]["reasons"])

    doc = json.loads((run_dir / "bench" / "results.json").read_text())
    assert doc["target"]["name"] == "laptop-cpu"
    by = {e["name"]: e for e in doc["artifacts"]}
    assert {"pytorch", "gguf-q4_k_m", "gguf-q8_0", "onnx-int4"} <= set(by) and all(e["status"] == "ok" for e in by.values())
    decision = doc["ship_decision"]
    ggufs = [c for c in decision["candidates"] if c["format"] == "gguf"]
    assert len(ggufs) >= 2 and decision["chosen"] in {c["name"] for c in ggufs}  # ship: auto chose among the GGUFs
    chosen = by[decision["chosen"]]
    shipped = sorted((run_dir / "ship").glob("*.gguf"))
    assert len(shipped) == 1 and shipped[0].read_bytes() == run.artifact_path(decision["chosen"]).read_bytes()
    assert 0 < by["pytorch"]["accuracy"] and chosen["accuracy"] is not None

    predictions = json.loads((run_dir / "bench" / "predictions.json").read_text())[decision["chosen"]]
    examples = bench.run_examples(run)[0]  # the rows bench scored: the run's frozen test split
    assert [p["target"] for p in predictions] == [ex["target"] for ex in examples[: len(predictions)]]
    proc, url = start_serve_cli([str(run_dir / "ship"), "--port", "0", "--threads", "1"])
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for p, ex in list(zip(predictions, examples, strict=False))[:4]:
            user = [m for m in ex["messages"] if m["role"] != "system"]  # the bundle's Modelfile carries the system prompt
            out = client.chat.completions.create(model=model, messages=user, max_tokens=doc["eval"]["max_new_tokens"], temperature=0)
            assert (out.choices[0].message.content or "").strip() == p["answer"], (p, ex["messages"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
