"""Shared fixtures: a tiny random Llama model and a real chat tokenizer, built at test time.

The tokenizer is SmolLM2's (ChatML template, `<|im_end|>` ends a turn), read from the GGUF
that the embedded-model package ships; the tiny model has random weights and that vocabulary,
so it goes through the same converter, runtimes and chat template as the real model.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml
from families import family_model_dir  # noqa: F401  (fixture: tiny Llama 3 / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 models)

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the ftedge cache of the test session away from the user's."""
    os.environ["FTEDGE_CACHE"] = str(tmp_path_factory.mktemp("ftedge-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from ftedge.models import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama saved as safetensors with the tokenizer and a generation config."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), **{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def write_text_label_csv(path: Path, n: int = 64, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    templates = {
        "card_arrival": ["where is my new card", "my card has not arrived yet", "when will the card come"],
        "lost_or_stolen_card": ["i lost my card", "my card was stolen", "someone took my card"],
        "exchange_rate": ["what is the exchange rate", "how much is a euro in dollars", "rate for pounds"],
        "top_up_failed": ["my top up failed", "the top-up did not work", "why was my top up declined"],
    }
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            w.writerow([rng.choice(templates[label]) + rng.choice(["", "?", " please", "!"]), label])
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A valid recipe on the tiny model and a small text_label CSV."""
    data = write_text_label_csv(tmp_path / "train.csv")
    recipe = {
        "name": "tiny",
        "base_model": str(tiny_model_dir),
        "data": {"train": data.name, "format": "text_label", "text_field": "text", "label_field": "category",
                 "system_prompt": "Reply with the intent label.", "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "lora", "max_steps": 4, "batch_size": 4, "lr": 1.0e-3, "max_length": 64,
                  "eval_every": 2, "save_every": 2, "seed": 0},
        "export": {"target": "laptop-cpu"},
        "eval": {"task": "label_match", "max_examples": 8},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
