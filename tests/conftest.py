"""Every shared fixture (plain helper functions are in tests/helpers.py, tiny-model building in
tests/tiny_models.py): a real chat tokenizer, tiny models, their GGUFs, a base model with an adapter,
the family models and the converter shim, built at test time.

The tokenizer is SmolLM2's (ChatML template, `<|im_end|>` ends a turn), read from the GGUF
that the embedded-model package ships; the tiny model has random weights and that vocabulary,
so it goes through the same converter, runtimes and chat template as the real model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import make_adapter, write_text_label_csv
from tiny_models import FAMILY_SPECS, converter_shim_env, make_family_model, make_tiny_model, trained_tiny_model


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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model as a float32 GGUF (lossless: it dequantizes back to the same weights)."""
    from ftedge.export.gguf import convert_to_gguf

    return convert_to_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf", outtype="f32")


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random model with larger initial weights than ``tiny_model_dir``: its greedy replies are varied text
    (``tiny_model_dir`` answers every prompt with newlines, which would hide mixed-up or truncated answers)."""
    return make_tiny_model(tmp_path_factory.mktemp("varied-hf"), tokenizer_dir, initializer_range=0.2)


@pytest.fixture(scope="session")
def varied_gguf(tmp_path_factory: pytest.TempPathFactory, varied_model_dir: Path) -> Path:
    """``varied_model_dir`` as an f16 GGUF."""
    from ftedge.export.gguf import convert_to_gguf

    return convert_to_gguf(varied_model_dir, tmp_path_factory.mktemp("varied-gguf") / "tiny.f16.gguf", outtype="f16")


@pytest.fixture(scope="session")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A trained tiny base model and a random non-zero LoRA adapter on it (read-only: copy before changing either)."""
    root = tmp_path_factory.mktemp("base-and-adapter")
    base = trained_tiny_model(root / "base", tokenizer_dir)
    return base, make_adapter(base, root / "adapter")


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[Callable[[str], Path]]:
    """``family_model_dir("qwen2")`` -> a tiny random Qwen2 folder (tiny_models.FAMILIES), built once per session
    (its GGUF export needs the ``converter_shim`` fixture)."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            # named after the source model: llama.cpp refuses a phi3 GGUF with a BPE vocabulary whose
            # general.name (the converter takes it from the folder name) contains "phi3"
            folder = tmp_path_factory.mktemp("tiny-" + FAMILY_SPECS[family].source.split("/")[-1])
            built[family] = make_family_model(family, folder, tokenizer_dir)
        return built[family]

    yield build


@pytest.fixture(scope="module")
def converter_shim() -> Iterator[None]:
    """While a module's tests run, ``python -m convert_hf_to_gguf`` (as ftedge runs it) knows the family fixtures'
    BPE pre-tokenizers (tiny_models.converter_shim_env)."""
    with converter_shim_env():
        yield


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
