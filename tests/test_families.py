"""Bring-your-own-model diagnostics: Llama 3, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3/Phi-4-mini, stage by stage.

Each check runs on a tiny random model of the family (``tests/tiny_models.py``: the family's own
config class, real chat template and special tokens). What fails with today's code is marked
``xfail(strict=True)`` with the cause; remove the marker with the fix. Fast checks (templates,
end-of-turn, data encoding, LoRA targets, preflight) run in the default suite; GGUF / ONNX
exports and training are ``slow`` (``make test-slow``). The ``family_model_dir`` and ``converter_shim``
fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import write_text_label_csv
from tiny_models import FAMILIES, FAMILY_SPECS, Family

from ftedge.errors import FtedgeError

pytestmark = pytest.mark.usefixtures("converter_shim")  # GGUF exports of the fixtures' vocabularies

SYSTEM = "Reply with the intent label."
LONG = "my card has not arrived yet and i have been waiting for two weeks now, where is my new card and when will it come"


def _xfail(cases: dict[str, str]) -> list[Any]:
    """FAMILIES as params, with ``xfail(strict=True, reason=...)`` on the families in ``cases``."""
    unknown = set(cases) - set(FAMILIES)
    assert not unknown, unknown
    return [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=cases[f])) if f in cases else f for f in FAMILIES]


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=16)
def _tok(folder: Path) -> Any:
    """The folder's tokenizer (cached: loading a 49k-token BPE takes ~1 s; do not mutate it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _conversations(fam: Family) -> list[list[dict[str, str]]]:
    """Chats the family's template accepts: with a system message where it has a system role."""
    head = [{"role": "system", "content": SYSTEM}] if fam.system_role and fam.name != "gemma2" else []
    return [
        [*head, {"role": "user", "content": "where is my new card"}],
        [{"role": "user", "content": "i lost my card"}],
        [*head, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "card_arrival"}, {"role": "user", "content": LONG}],
    ]


def _token_id(tok: Any, text: str) -> int:
    tid = tok.convert_tokens_to_ids(text)
    assert isinstance(tid, int) and tid != tok.unk_token_id, text
    return tid


def _prompts(fam: Family) -> list[Any]:
    from ftedge.data.prompts import Prompt

    head = [{"role": "system", "content": SYSTEM}] if fam.system_role and fam.name != "gemma2" else []
    rows = (("where is my new card", "card_arrival"), (LONG, "card_arrival"), ("i lost my card", "lost_or_stolen_card"))
    return [Prompt([*head, {"role": "user", "content": u}], t) for u, t in rows]


def _logit_parity(backend: Any, reference: Any) -> dict[str, float]:
    from ftedge.logits import compare_logits

    return compare_logits(reference.logprobs, [backend.logits(ids)[reference.start :] for ids in reference.ids])


# ====================================================================== fast: the fixtures, templates, data
@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_is_the_family(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """The tiny model is the family's own class with its shapes, tied embeddings and special tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = FAMILY_SPECS[family]
    folder = family_model_dir(family)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == fam.model_type and config.architectures == [fam.architecture] and config.tie_word_embeddings
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tok = _tok(folder)
    assert tok.chat_template == fam.template
    assert tok.eos_token == fam.eos and tok.bos_token == fam.bos
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {fam.end_of_turn, *fam.specials} <= special
    assert (tok("hi")["input_ids"][0] == tok.bos_token_id) == fam.add_bos
    names = {n for n, _ in model.named_modules()}
    if family == "phi3":
        assert any(n.endswith("self_attn.qkv_proj") for n in names) and any(n.endswith("mlp.gate_up_proj") for n in names)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if family == "gemma2":
        assert config.final_logit_softcapping and config.attn_logit_softcapping and config.sliding_window < 64
    if family == "gemma3_text":
        assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_renders_the_family_template(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """The real template's family traits, as transformers renders them."""
    from datetime import datetime

    import jinja2

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    system_chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    done = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "card_arrival"}]
    answer = tok.apply_chat_template(done, tokenize=False)
    assert fam.end_of_turn in answer.split("card_arrival", 1)[1]
    if family == "gemma2":
        with pytest.raises(jinja2.TemplateError, match="System role not supported"):
            tok.apply_chat_template(system_chat, tokenize=False)
        return
    text = tok.apply_chat_template(system_chat, tokenize=False, add_generation_prompt=True)
    if fam.bos and fam.add_bos:
        assert text.startswith(fam.bos)
    if family == "llama3":
        assert "Cutting Knowledge Date: December 2023" in text and datetime.now().strftime("%d %b %Y") in text
    if family == "gemma3_text":
        assert text.endswith(f"<start_of_turn>user\n{SYSTEM}\n\nhi<end_of_turn>\n<start_of_turn>model\n")
    if family == "qwen3":
        off = tok.apply_chat_template(system_chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert off == text + "<think>\n\n</think>\n\n"
    if family == "qwen2":
        no_system = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert no_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


@pytest.mark.parametrize("family", FAMILIES)
def test_ftedge_renderer_matches_transformers(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """ftedge's own Jinja renderer (GGUF gate, Modelfile, chat) renders exactly as transformers."""
    from ftedge.formats.chat_template import render_chat_template

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    for messages in _conversations(fam):
        for gen in (True, False):
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            got = render_chat_template(
                fam.template, messages, add_generation_prompt=gen, bos_token=tok.bos_token or "", eos_token=tok.eos_token or ""
            )
            assert got == want


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_ftedge_renderer_raises_one_line_on_roles_the_template_refuses(family: str) -> None:
    from ftedge.formats.chat_template import render_chat_template

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # Gemma: roles must alternate
    with pytest.raises(FtedgeError, match="alternate"):
        render_chat_template(FAMILY_SPECS[family].template, bad, add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_token_is_the_family_one(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """models._end_of_turn_id (merge, .gguf bases) and ChatEncoder (training) agree on the family's end-of-turn token."""
    from ftedge.data.encoding import ChatEncoder
    from ftedge.families import end_of_turn_id

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    assert end_of_turn_id(tok) == _token_id(tok, fam.end_of_turn)
    assert ChatEncoder(tok, 256).eot == fam.end_of_turn


@pytest.mark.parametrize("family", FAMILIES)
def test_data_encoding_trains_the_answer_and_its_end_of_turn(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """A text_label row with data.system_prompt (as every shipped recipe has): only 'label<end-of-turn>' carries loss."""
    from ftedge.data.encoding import IGNORE, ChatEncoder
    from ftedge.data.reading import row_to_example
    from ftedge.recipe import DataConfig

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    cfg = DataConfig(train="x.csv", format="text_label", text_field="text", label_field="category", system_prompt=SYSTEM)
    example = row_to_example({"text": "where is my new card", "category": "card_arrival"}, "x.csv:row 1", cfg)
    enc = ChatEncoder(tok, 256).encode(example)
    assert enc is not None
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "card_arrival" + fam.end_of_turn
    prompt = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE])
    assert SYSTEM in prompt  # the system prompt reaches the model, whatever the template does with it


@pytest.mark.parametrize("family", FAMILIES)
def test_data_encoding_of_a_multi_turn_conversation(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """A ``messages`` row with two assistant turns: both answers (with their end-of-turn) carry loss."""
    from ftedge.data.encoding import IGNORE, ChatEncoder
    from ftedge.data.reading import row_to_example
    from ftedge.recipe import DataConfig

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    turns = [
        {"role": "user", "content": "i lost my card"},
        {"role": "assistant", "content": "lost_or_stolen_card"},
        {"role": "user", "content": "and the rate for pounds?"},
        {"role": "assistant", "content": "exchange_rate"},
    ]
    cfg = DataConfig(train="x.jsonl", format="messages")
    enc = ChatEncoder(tok, 256).encode(row_to_example({"messages": turns}, "x.jsonl:line 1", cfg))
    assert enc is not None
    runs: list[list[int]] = []
    for t, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab == IGNORE:
            if runs and runs[-1]:
                runs.append([])
            continue
        if not runs:
            runs.append([])
        runs[-1].append(t)
    answers = [tok.decode(r) for r in runs if r]
    assert answers == ["lost_or_stolen_card" + fam.end_of_turn, "exchange_rate" + fam.end_of_turn]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_linear_targets_the_family_projections(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """peft's all-linear (the recipes' default) adapts every projection, fused ones included (the family table's
    linear layers: Phi-3's qkv_proj and gate_up_proj), and not the tied head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftedge.families import family_of

    model = AutoModelForCausalLM.from_pretrained(family_model_dir(family), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    entry = family_of(FAMILY_SPECS[family].model_type)
    assert entry is not None and adapted == set(entry.linear_names)


@pytest.mark.parametrize("family", FAMILIES)
def test_preflight_knows_the_architecture_of_an_hf_folder(family: str, family_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from ftedge.backends.ortgenai import builder_architectures
    from ftedge.recipe import load_recipe
    from ftedge.targets import load_target
    from ftedge.validate import base_architecture, check_export_support, gguf_converter_architectures

    fam = FAMILY_SPECS[family]
    assert fam.architecture in gguf_converter_architectures() and fam.architecture in builder_architectures()
    recipe = _recipe(tmp_path, family_model_dir(family), family)
    assert base_architecture(load_recipe(recipe)) == fam.architecture
    notes = check_export_support(fam.architecture, load_target("laptop-cpu"), str(recipe))
    assert notes == [f"architecture {fam.architecture}: exportable to GGUF and ONNX"]


def _render_go(template: str, default_system: str | None, messages: list[dict[str, str]]) -> str:
    """Render a Go template as Ollama would (SYSTEM as the default system message): a small interpreter of the
    text/template subset ftedge writes (range .Messages, if / else if / else / end, eq, not, and, index,
    $variables), independent of how ftedge.formats.modelfile builds the template."""
    import re

    if default_system and not any(x["role"] == "system" for x in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    parts = re.split(r"({{.*?}})", template, flags=re.S)
    assert not any(p.startswith("{{-") or p.endswith("-}}") for p in parts), "whitespace trimming next to literal text"
    pos = 0

    def action(i: int) -> str:
        return parts[i][2:-2].strip() if parts[i].startswith("{{") else ""

    def block() -> list[Any]:
        nonlocal pos
        nodes: list[Any] = []
        while pos < len(parts):
            act = action(pos)
            if act == "end" or act.startswith("else"):
                return nodes
            pos += 1
            if not parts[pos - 1].startswith("{{"):
                nodes.append(("text", parts[pos - 1]))
            elif act.startswith(("if ", "range ")):
                branches = [(act, block())]
                while action(pos) != "end":
                    pos += 1
                    branches.append((action(pos - 1), block()))
                pos += 1
                nodes.append(("branches", branches))
            else:
                nodes.append(("action", act))
        return nodes

    tree = block()
    assert pos == len(parts), template
    env: dict[str, Any] = {}

    def value(expr: str, dot: Any) -> Any:
        expr = expr.strip()
        while expr.startswith("(") and expr.endswith(")"):
            expr = expr[1:-1].strip()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr == ".Messages":
            return messages
        if expr.startswith("$"):
            return env[expr]
        m = re.fullmatch(r"\(index \.Messages (\d+)\)\.Role", expr)
        if m:
            return messages[int(m.group(1))]["role"]
        if expr in (".Role", ".Content"):
            return dot[expr[1:].lower()]
        fn, args = expr.split(" ", 1)
        items, depth, quoted, cur = [], 0, False, ""  # arguments: split on spaces outside parentheses and quotes
        for ch in args + " ":
            if ch == " " and not depth and not quoted:
                items, cur = items + [cur] if cur else items, ""
                continue
            depth += (ch == "(") - (ch == ")") if not quoted else 0
            quoted ^= ch == '"'
            cur += ch
        if fn == "eq":
            return value(items[0], dot) == value(items[1], dot)
        if fn == "not":
            return not value(items[0], dot)
        if fn == "and":
            return all(value(i, dot) for i in items)  # short-circuits, as Go >= 1.18
        raise AssertionError(f"unknown function {fn}")

    def run(nodes: list[Any], dot: Any) -> str:
        out = []
        for kind, node in nodes:
            if kind == "text":
                out.append(node)
            elif kind == "action":
                m = re.fullmatch(r"(\$\w+) :?= (.+)", node)
                if m:
                    env[m.group(1)] = value(m.group(2), dot)
                else:
                    out.append(str(value(node, dot)))
            elif node[0][0].startswith("range "):
                out.extend(run(node[0][1], item) for item in value(node[0][0][len("range ") :], dot))
            else:
                for head, body in node:
                    cond = head.removeprefix("else").strip().removeprefix("if ").strip()
                    if not cond or value(cond, dot):
                        out.append(run(body, dot))
                        break
        return "".join(out)

    return run(tree, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_modelfile_template_renders_like_transformers(family: str, family_model_dir: Callable[[str], Path]) -> None:
    """The Ollama TEMPLATE ftedge derives from the GGUF's Jinja template renders chats as transformers does."""
    from ftedge.formats.chat_template import fit_messages, trained_chat_template
    from ftedge.formats.modelfile import go_template

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    jinja = trained_chat_template(fam.template)  # what ftedge ships: Qwen3 with thinking off

    def want(messages: list[dict[str, str]]) -> str:  # as every ftedge runtime renders it
        return tok.apply_chat_template(fit_messages(messages, jinja), chat_template=jinja, tokenize=False, add_generation_prompt=True)

    template, default_system = go_template(jinja, bos=tok.bos_token or "", eos=tok.eos_token or "", end_of_turn=fam.end_of_turn)
    system = [{"role": "system", "content": SYSTEM}]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": LONG}]
    for messages in [*_conversations(fam), [*system, *turns]]:
        assert _render_go(template, default_system, messages) == want(messages)
    # Ollama prepends the Modelfile's SYSTEM as a system message
    assert _render_go(template, SYSTEM, turns) == want([*system, *turns])


def _recipe(tmp_path: Path, base: Path, family: str, *, steps: int = 4) -> Path:
    """conftest's tiny_recipe on a family model (Gemma 2 too: ftedge folds the system prompt into the first user turn)."""
    data = write_text_label_csv(tmp_path / "train.csv")
    system = SYSTEM
    recipe = {
        "name": f"tiny-{family}",
        "base_model": str(base),
        "data": {
            "train": data.name,
            "format": "text_label",
            "text_field": "text",
            "label_field": "category",
            "system_prompt": system,
            "val_fraction": 0.25,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {
            "method": "lora",
            "max_steps": steps,
            "batch_size": 4,
            "lr": 1.0e-3,
            "max_length": 96,
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


# ====================================================================== slow: GGUF
@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory, family_model_dir: Callable[[str], Path]) -> Callable[[str], dict[str, Any]]:
    """``gguf_files(family)`` -> f16 and q8_0 GGUFs of the base folder (ftedge.export.gguf), built once."""
    from ftedge.export.gguf import build_f16, quantize_gguf

    built: dict[str, dict[str, Any]] = {}

    def build(family: str) -> dict[str, Any]:
        if family not in built:
            out = tmp_path_factory.mktemp(f"gguf-{family}")
            f16, meta = build_f16(family_model_dir(family), out / "model-f16.gguf")
            report = quantize_gguf(f16, out / "model-q8_0.gguf", "q8_0", threads=2)
            built[family] = {"f16": f16, "q8_0": out / "model-q8_0.gguf", "meta": meta, "report": report}
        return built[family]

    return build


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_keeps_template_specials_and_tied_head(
    family: str, family_model_dir: Callable[[str], Path], gguf_files: Callable[[str], dict[str, Any]]
) -> None:
    from ftedge.formats.gguf import inspect_gguf

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    files = gguf_files(family)
    for kind in ("f16", "q8_0"):
        info = inspect_gguf(files[kind])
        assert info.chat_template == fam.template
        assert info.special_texts["eos"] == fam.eos
        if fam.bos:
            assert info.special_texts["bos"] == fam.bos
        assert info.metadata["tokenizer.ggml.add_bos_token"] == fam.add_bos
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(files["q8_0"]).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: no second vocab x hidden matrix
    assert files["meta"]["bos"] == (tok.convert_tokens_to_ids(fam.config_bos) if fam.config_bos else None)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_records_the_family_end_of_turn(
    family: str, family_model_dir: Callable[[str], Path], gguf_files: Callable[[str], dict[str, Any]]
) -> None:
    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    assert gguf_files(family)["meta"]["eot"] == _token_id(tok, fam.end_of_turn)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_runs_the_gguf_like_transformers(
    family: str, family_model_dir: Callable[[str], Path], gguf_files: Callable[[str], dict[str, Any]]
) -> None:
    """llama.cpp loads f16 and q8_0, tokenizes as HF, stops on the family's end-of-turn, and f16 logits match transformers."""
    from ftedge.backends.llamacpp import LlamaCppBackend
    from ftedge.export.gate import build_reference

    fam = FAMILY_SPECS[family]
    folder = family_model_dir(family)
    tok = _tok(folder)
    reference = build_reference(folder, _prompts(fam), threads=2)
    # q8_0 bound is loose: random weights with peaked attention amplify 8-bit rounding (KL ~0.08 measured);
    # a broken conversion (tensor layout, norm offset, soft-cap) gives several nats.
    for kind, (min_top1, max_kl) in (("f16", (0.9, 0.01)), ("q8_0", (0.7, 0.25))):
        with LlamaCppBackend(gguf_files(family)[kind], threads=2, n_ctx=512) as backend:
            for text in reference.texts:
                assert backend.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
            assert _token_id(tok, fam.end_of_turn) in backend.stop_ids
            figures = _logit_parity(backend, reference)
            assert figures["top1"] >= min_top1 and figures["kl"] <= max_kl, (kind, figures)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_backend_renders_the_template_exactly(
    family: str, family_model_dir: Callable[[str], Path], gguf_files: Callable[[str], dict[str, Any]]
) -> None:
    from ftedge.backends.llamacpp import LlamaCppBackend

    fam = FAMILY_SPECS[family]
    tok = _tok(family_model_dir(family))
    with LlamaCppBackend(gguf_files(family)["q8_0"], threads=2, n_ctx=256) as backend:
        for messages in _conversations(fam):
            assert backend.apply_chat_template(messages) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_preflight_reads_the_architecture_of_a_gguf_base(family: str, gguf_files: Callable[[str], dict[str, Any]], tmp_path: Path) -> None:
    from ftedge.recipe import load_recipe
    from ftedge.validate import base_architecture

    recipe = load_recipe(_recipe(tmp_path, gguf_files(family)["q8_0"], family))
    assert base_architecture(recipe) == FAMILY_SPECS[family].architecture


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_gguf_base_dequantizes_to_the_family_model(
    family: str, family_model_dir: Callable[[str], Path], gguf_files: Callable[[str], dict[str, Any]]
) -> None:
    """models.gguf_to_hf (a .gguf as base_model): same architecture, template, tokens, and the end-of-turn as eos."""
    from transformers import AutoConfig, GenerationConfig

    from ftedge.loader import gguf_to_hf

    fam = FAMILY_SPECS[family]
    tok0 = _tok(family_model_dir(family))
    out = gguf_to_hf(gguf_files(family)["f16"])
    assert AutoConfig.from_pretrained(out).architectures == [fam.architecture]
    tok = _tok(out)
    for messages in _conversations(fam):
        text = tok0.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == tok0(text, add_special_tokens=False)["input_ids"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == _token_id(tok0, fam.end_of_turn)


# ====================================================================== slow: ONNX
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_fp32_export_runs_like_transformers(family: str, family_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """export_onnx fp32 builds and checks the folder; ORT GenAI renders the template and tokenizes exactly, logits match."""
    from ftedge.backends.ortgenai import OrtGenAIBackend
    from ftedge.export.gate import build_reference
    from ftedge.export.onnx import export_onnx

    fam = FAMILY_SPECS[family]
    folder = family_model_dir(family)
    tok = _tok(folder)
    out = export_onnx(folder, tmp_path / "onnx-fp32", "fp32")
    reference = build_reference(folder, _prompts(fam), threads=2)
    with OrtGenAIBackend(out, threads=2) as backend:
        for messages in _conversations(fam):
            assert backend.apply_chat_template(messages) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for text in reference.texts:
            assert backend.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
        assert _token_id(tok, fam.end_of_turn) in backend.stop_ids
        figures = _logit_parity(backend, reference)
        assert figures["top1"] >= 0.99 and figures["kl"] <= 0.001, figures


# ====================================================================== slow: ftedge run, every stage
def _family_target(tmp_path: Path, *, gguf: bool = True, onnx: bool = True) -> Path:
    """f16 GGUF and fp32 ONNX: exact formats, so the gates hold a 4-step random tiny model to float tolerance."""
    target = {
        "name": "tiny-family",
        "gguf": {"quants": ["f16"]} if gguf else None,
        "onnx": {"precisions": ["fp32"]} if onnx else None,
        "n_ctx": 512,
        "threads": 2,
        "ship": "f16" if gguf else None,
        "gates": {
            "f16": {"min_top1_confident": 0.9, "max_kl": 0.01, "max_kl_p99": 0.1},
            "fp32": {"min_top1_confident": 0.99, "max_kl": 0.001, "max_kl_p99": 0.01},
        },
    }
    path = tmp_path / "tiny-family.yaml"
    path.write_text(yaml.safe_dump(target, sort_keys=False))
    return path


def _vocab_matrices(onnx_dir: Path, vocab: int) -> int:
    """Initializers of the ONNX graph with a vocabulary-sized dimension (embedding table, LM head)."""
    import onnx

    proto = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    return sum(1 for t in proto.graph.initializer if len(t.dims) == 2 and vocab in t.dims)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ftedge_run_takes_the_family_through_every_stage(family: str, family_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """``ftedge run`` (LoRA all-linear, system prompt, 4 steps) -> merge -> GGUF f16 + ONNX fp32 -> bench -> ship.

    Every gate passes with the tokenizer and template checks exact; the trained template (the family's,
    Qwen3's with thinking off) is in the merged tokenizer, the GGUF, the ORT GenAI folder and the shipped
    GGUF; the tied head stays one matrix in the merged weights, the GGUF and the ONNX graph."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from ftedge.cli import main
    from ftedge.formats.chat_template import trained_chat_template
    from ftedge.formats.gguf import inspect_gguf
    from ftedge.manifest import Run

    fam = FAMILY_SPECS[family]
    base = family_model_dir(family)
    recipe = _recipe(tmp_path, base, family)
    run_dir = tmp_path / "run"
    overrides = ["-o", f"export.target={_family_target(tmp_path)}", "-o", "eval.max_examples=4"]
    res = CliRunner().invoke(main, ["run", str(recipe), *overrides, "--run-dir", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = Run.open(run_dir)
    losses = [json.loads(x)["loss"] for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    template = trained_chat_template(fam.template)
    assert (template != fam.template) == (family == "qwen3")

    merged = run.artifact_path("merged")
    drift = run.artifact("merged").entry["drift"]  # merged weights vs base + adapter (fused projections included)
    assert drift["top1"] == 1.0 and drift["kl"] <= 1e-6, drift
    with safe_open(str(next(merged.glob("*.safetensors"))), framework="pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"]
    assert _tok(merged).chat_template == template
    if (base / "tokenizer.model").is_file():  # SentencePiece: llama.cpp's converter reads it and added_tokens_decoder
        assert (merged / "tokenizer.model").is_file()
        assert json.loads((merged / "tokenizer_config.json").read_text()).get("added_tokens_decoder")

    for key in ("gguf-f16", "onnx-fp32"):
        gate = run.artifact(key).gate
        assert gate["passed"], (key, gate)
        assert gate["tokenizer"]["mismatches"] == 0 and gate["tokenizer"]["chat_template_mismatches"] == 0, (key, gate["tokenizer"])
    info = inspect_gguf(run.artifact_path("gguf-f16"))
    assert info.chat_template == template
    assert info.token_id("eot") == _token_id(_tok(base), fam.end_of_turn) or info.token_id("eos") == _token_id(_tok(base), fam.end_of_turn)
    assert "token_embd.weight" in info.tensor_names and "output.weight" not in info.tensor_names  # tied: one vocab x hidden matrix
    onnx_dir = run.artifact_path("onnx-fp32")
    assert (onnx_dir / "chat_template.jinja").read_text() == template
    assert _vocab_matrices(onnx_dir, json.loads((merged / "config.json").read_text())["vocab_size"]) == 1  # embedding = LM head

    shipped = [p for p in (run_dir / "ship").iterdir() if p.suffix == ".gguf"]
    assert len(shipped) == 1 and inspect_gguf(shipped[0]).chat_template == template


# ====================================================================== fast: built-in chat templates (recipe key chat_template)
@pytest.mark.parametrize("name", ["chatml", "gemma", "llama3", "phi3"])
def test_builtin_chat_templates_train_and_stop(name: str, family_model_dir: Callable[[str], Path]) -> None:
    """Each built-in template, on a vocabulary with its turn tokens: system role, end-of-turn found, only the answer trained."""
    from ftedge.data.encoding import IGNORE, ChatEncoder
    from ftedge.data.reading import row_to_example
    from ftedge.families import end_of_turn_token
    from ftedge.formats.chat_template import read_chat_template, system_role_supported
    from ftedge.loader import training_tokenizer
    from ftedge.recipe import DataConfig

    family = {"chatml": "qwen2", "gemma": "gemma3_text", "llama3": "llama3", "phi3": "phi3"}[name]
    template = read_chat_template(name)
    assert system_role_supported(template)
    tok = training_tokenizer(family_model_dir(family), name)
    assert tok.chat_template == template
    eot = end_of_turn_token(tok)
    assert eot == FAMILY_SPECS[family].end_of_turn
    cfg = DataConfig(train="x.csv", format="text_label", text_field="text", label_field="category", system_prompt=SYSTEM)
    enc = ChatEncoder(tok, 256).encode(row_to_example({"text": "where is my new card", "category": "card_arrival"}, "x.csv:row 1", cfg))
    assert enc is not None
    assert tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]) == "card_arrival" + eot


def test_a_builtin_template_whose_turn_tokens_the_vocabulary_lacks_is_one_line(family_model_dir: Callable[[str], Path]) -> None:
    from ftedge.loader import training_tokenizer

    with pytest.raises(FtedgeError, match=r"chat_template 'gemma' ends a turn with '<end_of_turn>', which is not one token"):
        training_tokenizer(family_model_dir("llama3"), "gemma")
