"""The model facts (ftedge/families.py) and template rules (ftedge/formats/chat_template.py), checked against the models.

Each family's table entry is held against a tiny model of the family with its real chat template
(``tests/families.py``); the torch runtime stops on the end-of-turn token as the other runtimes do;
a model folder's template is read where transformers reads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import write_gguf_header_only
from tiny_models import FAMILIES, FAMILY_SPECS

from ftedge.errors import FtedgeError
from ftedge.families import (
    END_OF_TURN_TOKENS,
    family_of,
    layer_linear_names,
    lora_target_problem,
    projection_parts,
)
from ftedge.formats.chat_template import (
    folder_chat_template,
    has_thinking_switch,
    read_tokenizer_config,
    system_role_supported,
    write_chat_template,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_entry_matches_the_family_model(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """End of turn, system role, thinking switch and the decoder's linear layers, as the family's real template and
    a model of the family's config class show them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftedge.families import end_of_turn_token

    spec = FAMILY_SPECS[family]
    entry = family_of(spec.model_type)
    assert entry is not None and family_of(spec.architecture) is entry
    folder = family_model_dir(family)
    tok = AutoTokenizer.from_pretrained(folder)
    assert end_of_turn_token(tok) in entry.end_of_turn
    assert spec.end_of_turn in END_OF_TURN_TOKENS
    assert system_role_supported(spec.template) is entry.system_role
    assert has_thinking_switch(spec.template) is entry.thinking_switch
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert family_of(model) is entry
    assert layer_linear_names(model) == sorted(entry.linear_names)
    modules = {name.split("layers.0.", 1)[1] for name, _ in model.named_modules() if ".layers.0." in name}
    for name, parts in entry.fused.items():  # a fused projection stacks modules that a Llama-style layer has separately
        assert name.rsplit(".", 1)[-1] in {m.rsplit(".", 1)[-1] for m in modules}
        assert [p.rsplit(".", 1)[-1] for p in projection_parts(name) or []] == list(parts)


def test_a_family_missing_from_the_table_falls_back_to_the_model(tiny_model_dir: Path) -> None:
    """A model type ftedge has no entry for: the generic rules read the model itself."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.model_type = "not-a-family"
    assert family_of(model) is None
    assert layer_linear_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_targets_of_a_gguf_base_are_checked_against_its_family(tmp_path: Path) -> None:
    """A .gguf base's targets are known before the dequantization: the family's linear layer names."""
    llama = write_gguf_header_only(tmp_path / "llama.gguf", "llama")
    assert lora_target_problem(str(llama), ["q_proj", "v_proj"]) is None
    problem = lora_target_problem(str(llama), ["q_proj", "qkv_proj"])
    assert problem is not None and "LlamaForCausalLM has no module named qkv_proj" in problem
    phi3 = write_gguf_header_only(tmp_path / "phi.gguf", "phi3")
    problem = lora_target_problem(str(phi3), ["q_proj"])
    assert problem is not None and "Phi3ForCausalLM has no module named q_proj" in problem
    assert lora_target_problem(str(phi3), "all-linear") is None


def test_torch_backend_stops_on_the_end_of_turn_token(tiny_model_dir: Path) -> None:
    """A template whose turn ends with another token than EOS: generation stops there, as llama.cpp and ORT GenAI stop."""
    from ftedge.backends.torch import TorchBackend
    from ftedge.formats.chat_template import read_chat_template

    template = read_chat_template("chatml").replace("<|im_end|>", "<|endoftext|>")  # <|endoftext|>: id 0, EOS: <|im_end|> (2)
    backend = TorchBackend(tiny_model_dir, threads=1, chat_template=template)
    eot = backend.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eot != backend.tokenizer.eos_token_id
    assert eot in backend.stop_ids
    backend.model.model.norm.weight.data.zero_()  # every logit 0: greedy picks id 0, the end of turn, each step
    ids = backend.chat_ids([{"role": "user", "content": "hi"}])
    assert list(backend.generate(ids, max_new_tokens=5)) == [eot]


def _tokenizer_folder(src: Path, out: Path) -> Path:
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out


def test_a_folder_template_is_read_where_transformers_reads_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """chat_template.jinja, else tokenizer_config.json (a processor's chat_template.json is not read): what AutoTokenizer loads."""
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(tiny_model_dir, tmp_path / "tok")
    cfg = read_tokenizer_config(folder)
    cfg["chat_template"] = "{{ 'config' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    layouts = [
        ("tokenizer_config.json", None),
        ("chat_template.json", lambda: (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))),
        ("chat_template.jinja", lambda: (folder / "chat_template.jinja").write_text("{{ 'jinja' }}")),
    ]
    seen = []
    for _, add in layouts:
        if add is not None:
            add()
        got = folder_chat_template(folder)
        assert got == AutoTokenizer.from_pretrained(folder).chat_template
        seen.append(got)
    assert seen == ["{{ 'config' }}", "{{ 'config' }}", "{{ 'jinja' }}"]
    write_chat_template(folder, "{{ 'written' }}")  # every reader gets the new one
    assert not (folder / "chat_template.json").exists()
    assert folder_chat_template(folder) == read_tokenizer_config(folder)["chat_template"] == "{{ 'written' }}"
    assert AutoTokenizer.from_pretrained(folder).chat_template == "{{ 'written' }}"


def test_a_damaged_tokenizer_config_is_one_line(tmp_path: Path) -> None:
    assert read_tokenizer_config(tmp_path) == {} and folder_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FtedgeError, match="tokenizer_config.json cannot be read as JSON"):
        folder_chat_template(tmp_path)
