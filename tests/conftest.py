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
from helpers import make_tiny_model, write_text_label_csv


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the ftedge cache of the test session away from the user's."""
    os.environ["FTEDGE_CACHE"] = str(tmp_path_factory.mktemp("ftedge-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from ftedge.hf import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


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
