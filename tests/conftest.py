"""Shared fixtures (the helpers they use live in tests/helpers.py): a tiny random Llama model
and a real chat tokenizer, built at test time.

The tokenizer is SmolLM2's (ChatML template, `<|im_end|>` ends a turn), read from the GGUF
that the embedded-model package ships; the tiny model has random weights and that vocabulary,
so it goes through the same converter, runtimes and chat template as the real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from families import family_model_dir  # noqa: F401  (fixture: tiny Llama 3 / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 models)
from helpers import make_tiny_model, trained_tiny_model, write_text_label_csv


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the ftedge cache of the test session away from the user's."""
    os.environ["FTEDGE_CACHE"] = str(tmp_path_factory.mktemp("ftedge-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer; ``FTEDGE_TEST_TOKENIZER`` names a saved copy on machines without the
    embedded model (the GPU check carries one: benchmarks/gpu_check.sh)."""
    from transformers import AutoTokenizer

    from ftedge.basemodel import embedded_gguf

    out = tmp_path_factory.mktemp("tokenizer")
    carried = os.environ.get("FTEDGE_TEST_TOKENIZER")
    if carried:
        AutoTokenizer.from_pretrained(carried).save_pretrained(out)
        return out
    gguf = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def confident_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The tiny model trained on helpers.ROWS and sharpened 3x: it answers them with top-1 margins of 3-4 nats."""
    return trained_tiny_model(tmp_path_factory.mktemp("confident"), tokenizer_dir, sharpen=3.0)


@pytest.fixture(scope="session")
def confident_ggufs(tmp_path_factory: pytest.TempPathFactory, confident_model_dir: Path) -> dict[str, Path]:
    """f16, q8_0 and q4_0 GGUFs of the confident tiny model (the gate and the bench tests share them)."""
    from ftedge.export.gguf import build_f16, build_quant

    root = tmp_path_factory.mktemp("confident-ggufs")
    f16, _ = build_f16(confident_model_dir, root / "model-f16.gguf")
    out = {"f16": f16}
    for q in ("q8_0", "q4_0"):
        out[q] = build_quant(f16, root / f"model-{q}.gguf", q, end_of_turn=2, threads=2)[0]
    return out


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A valid recipe on the tiny model and a small text_label CSV."""
    data = write_text_label_csv(tmp_path / "train.csv")
    recipe = {
        "name": "tiny",
        "base_model": str(tiny_model_dir),
        "data": {
            "train": data.name,
            "format": "text_label",
            "text_field": "text",
            "label_field": "category",
            "system_prompt": "Reply with the intent label.",
            "val_fraction": 0.25,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {
            "method": "lora",
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1.0e-3,
            "max_length": 64,
            "eval_every": 2,
            "save_every": 2,
            "seed": 0,
        },
        "export": {"target": "laptop-cpu"},
        "eval": {"task": "label_match", "max_examples": 8},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
