"""What ftedge knows about model families and model structure, in one place.

- :data:`FAMILIES`: one entry per family (Llama 3 / SmolLM2, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 /
  Phi-4-mini), keyed by transformers' ``model_type``, llama.cpp's GGUF architecture and the HF
  architecture class (litgpt's ``configs`` style): the tokens its chat templates end an assistant turn
  with, its template quirks (no system role, a thinking switch), the linear layers of its decoder
  layers (LoRA's ``all-linear`` without the head) and which of them are fused. A family missing from
  the table falls back to the generic rules below, which read the model itself.
- End of turn (:func:`end_of_turn_token`, :func:`end_of_turn_id`): read from the chat template, else
  the first known end-of-turn token in the vocabulary (:data:`END_OF_TURN_TOKENS`, from the table).
- The architecture of a base before any download (:func:`base_architecture`: HF folder, ``.gguf``
  header, known hub ids).
- Weights: tied input/output embeddings (:func:`tied_embeddings`, THE test of it), linear layers
  (:func:`is_linear`), LoRA target names (:func:`check_lora_targets`, :func:`lora_target_problem`:
  ``all-linear`` is peft's, which finds fused ``qkv_proj``/``gate_up_proj`` and skips the tied head).
- Layer access: the CausalLM inside a PEFT wrapper (:func:`causal_lm`), the decoder layers
  (:data:`LAYER`, :func:`layer_count`, :func:`layer_linear_names`), a prefix adapter's virtual
  tokens (:func:`prefix_tokens`).

Nothing here loads a model or needs a runtime: functions take a loaded model, a config, a
tokenizer or a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge.basemodel import is_hf_folder, locate_base_model
from ftedge.errors import FtedgeError

# --------------------------------------------------------------------------- the family table
# The projections of a Llama-style decoder layer, by transformers' names, and the fused ones some
# families have instead (Phi-3: qkv_proj stacks q/k/v, gate_up_proj stacks gate/up along the output).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LLAMA_LINEAR = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
FUSED_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What ftedge knows about one model family."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type
    architectures: tuple[str, ...]  # config.json architectures[0] (transformers' CausalLM class)
    gguf_architectures: tuple[str, ...]  # a GGUF's general.architecture (llama.cpp's name)
    end_of_turn: tuple[str, ...]  # the tokens its chat templates end an assistant turn with, the usual one first
    linear_names: tuple[str, ...] = LLAMA_LINEAR  # linear layers of a decoder layer (LoRA all-linear, without the head)
    system_role: bool = True  # its template renders a leading system message (Gemma 2's raises)
    thinking_switch: bool = False  # its template turns thinking on/off by enable_thinking (Qwen3)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """Its fused projections and the separate ones each stacks (Phi-3's ``qkv_proj`` = q, k, v)."""
        return {name: FUSED_PROJECTIONS[name] for name in self.linear_names if name in FUSED_PROJECTIONS}


# Order matters for END_OF_TURN_TOKENS: the first known one in a vocabulary ends a turn when the template cannot be probed.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2",
            model_types=("qwen2",),
            architectures=("Qwen2ForCausalLM",),
            gguf_architectures=("qwen2",),
            end_of_turn=("<|im_end|>",),
            notes=("Qwen2 / Qwen2.5: ChatML",),
        ),
        Family(
            name="qwen3",
            model_types=("qwen3",),
            architectures=("Qwen3ForCausalLM",),
            gguf_architectures=("qwen3",),
            end_of_turn=("<|im_end|>",),
            thinking_switch=True,
            notes=("ChatML with <think> tags; trained_chat_template turns thinking off",),
        ),
        Family(
            name="llama",
            model_types=("llama",),
            architectures=("LlamaForCausalLM",),
            gguf_architectures=("llama",),
            end_of_turn=("<|eot_id|>", "<|im_end|>"),
            notes=("Llama 3.x ends a turn with <|eot_id|> (not <|end_of_text|>); SmolLM2 is a Llama with ChatML",),
        ),
        Family(
            name="gemma2",
            model_types=("gemma2",),
            architectures=("Gemma2ForCausalLM",),
            gguf_architectures=("gemma2",),
            end_of_turn=("<end_of_turn>",),
            system_role=False,
            notes=("its template raises on a system message: fit_messages folds it into the first user turn",),
        ),
        Family(
            name="gemma3",
            model_types=("gemma3_text", "gemma3"),
            architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
            gguf_architectures=("gemma3",),
            end_of_turn=("<end_of_turn>",),
            notes=("its template folds a system message into the first user turn itself",),
        ),
        Family(
            name="phi3",
            model_types=("phi3",),
            architectures=("Phi3ForCausalLM",),
            gguf_architectures=("phi3",),
            end_of_turn=("<|end|>",),
            linear_names=FUSED_LINEAR,
            notes=("Phi-3, Phi-4-mini: fused qkv_proj and gate_up_proj",),
        ),
    )
}


def family_of(key: Any) -> Family | None:
    """The family of a model type, HF architecture, GGUF architecture, or a config / model that has a ``model_type``;
    None for a family ftedge has no entry for (the generic rules apply)."""
    if not isinstance(key, str):
        config = getattr(key, "config", key)
        key = getattr(config, "model_type", None)
        if not isinstance(key, str):
            return None
    for fam in FAMILIES.values():
        if key in fam.model_types or key in fam.architectures or key in fam.gguf_architectures:
            return fam
    return None


def projection_parts(name: str) -> list[str] | None:
    """Module paths inside a decoder layer (``self_attn.q_proj`` ...) behind a projection name, a fused one
    stacked from its parts (``qkv_proj`` -> q, k, v); None for a name that is not a known projection."""
    for block, names in (("self_attn", (*ATTENTION_PROJECTIONS, "qkv_proj")), ("mlp", (*MLP_PROJECTIONS, "gate_up_proj"))):
        if name in names:
            return [f"{block}.{part}" for part in FUSED_PROJECTIONS.get(name, (name,))]
    return None


# --------------------------------------------------------------------------- end of turn
# Tokens that end a turn in the chat formats ftedge knows (the table's, in its order), and GPT-style
# end-of-text. Used when a template cannot be probed.
END_OF_TURN_TOKENS = tuple(dict.fromkeys([t for fam in FAMILIES.values() for t in fam.end_of_turn] + ["<|endoftext|>"]))
_PROBE = "\x00ANSWER\x00"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token text that ends an assistant turn.

    Read from the chat template itself: the first special token the template writes after an
    assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ...). Without a
    template: the first known end-of-turn token in the vocabulary, else the EOS token.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
            )
        except Exception:  # a template that refuses the probe: fall back to the vocabulary
            text = ""
        after = text.split(_PROBE, 1)[1] if _PROBE in text else ""
        specials = {t for t in getattr(tokenizer, "all_special_tokens", []) if t} | set(END_OF_TURN_TOKENS)
        found = [(after.find(t), t) for t in specials if t in after]
        if found:
            return min(found)[1]
    for tok in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
            return tok
    return getattr(tokenizer, "eos_token", None)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """Id of :func:`end_of_turn_token` (None when the tokenizer has neither that nor an EOS token)."""
    tok = end_of_turn_token(tokenizer)
    if tok is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(tok)
    return int(tid) if isinstance(tid, int) and tid >= 0 else getattr(tokenizer, "eos_token_id", None)


# --------------------------------------------------------------------------- architectures
# Architectures of the hub models the shipped recipes name (their config.json on the hub), so that
# `ftedge validate` knows them offline. Anything else is read from the hub cache or the network.
HUB_ARCHITECTURES = {
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen2ForCausalLM",
    "meta-llama/Llama-3.2-1B-Instruct": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "LlamaForCausalLM",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "LlamaForCausalLM",
}
# llama.cpp architecture names whose transformers model_type differs (transformers' GGUF loader does the same)
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


@dataclass(frozen=True)
class Architecture:
    """A base model's HF architecture (``config.architectures[0]``) and where it was read."""

    name: str | None
    source: str  # "config.json", "GGUF header", "known hub id", "hub config", or why it is unknown
    gguf_arch: str | None = None  # llama.cpp's name, for a .gguf base


def gguf_architecture(path: Path) -> Architecture:
    """The HF architecture of a ``.gguf`` file from its header; an error when transformers cannot dequantize it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ftedge.formats.gguf import inspect_gguf

    info = inspect_gguf(path)
    arch = info.architecture or ""
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and GGUF_MODEL_TYPES.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        raise FtedgeError(
            f"{path}: transformers cannot read a GGUF of architecture {arch!r} (ftedge dequantizes a .gguf base with it)",
            hint="give the model as an HF folder with safetensors weights, or a .gguf of a supported architecture",
        )
    model_type = GGUF_MODEL_TYPES.get(arch, arch)
    if arch == "llama" and "mistral" in str(info.metadata.get("general.name", "")).lower():
        model_type = "mistral"
    return Architecture(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type), "GGUF header", arch)


def hub_config_architecture(repo_id: str) -> Architecture:
    """A hub model's architecture from its config.json (the local hub cache, else the network)."""
    try:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as err:  # offline, gated, missing: known once the model is downloaded
        return Architecture(None, f"hub config not readable ({type(err).__name__})")
    archs = config.get("architectures") or []
    return Architecture(archs[0] if archs else None, "hub config")


def base_architecture(spec: str) -> Architecture:
    """The HF architecture of a recipe's ``base_model`` without loading weights, by the rules training resolves it
    with (:func:`locate_base_model`): an embedded alias or a ``.gguf`` (its header), an HF folder (config.json), a hub
    id (the table of known ids, else its config.json). One-line errors for what training would refuse."""
    source = locate_base_model(spec)
    if source.kind in ("alias", "gguf"):
        assert source.path is not None
        return gguf_architecture(source.path)
    if source.kind == "folder":
        assert source.path is not None
        config = source.path / "config.json"
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FtedgeError(f"{config} cannot be read as JSON ({err})", hint="fix or replace the model's config.json") from None
        archs = raw.get("architectures") if isinstance(raw, dict) else None
        return Architecture(str(archs[0]) if isinstance(archs, list) and archs else None, "config.json")
    if spec in HUB_ARCHITECTURES:
        return Architecture(HUB_ARCHITECTURES[spec], "known hub id")
    return hub_config_architecture(spec)


# --------------------------------------------------------------------------- weights
def tied_embeddings(config: Any) -> bool:
    """Whether the LM head is the input embedding (Qwen2.5-0.5B, Llama 3.2 1B/3B, Gemma, SmolLM2, Phi-4-mini)."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    return bool(getattr(text, "tie_word_embeddings", False))


def adapts_tied_embedding(model: Any) -> bool:
    """Whether a PEFT model's adapter sits on the LM head or input embedding of a model that ties them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not tied_embeddings(model.config):
        return False
    tied = ("lm_head", "embed_tokens")
    return any(isinstance(module, BaseTunerLayer) and name.rsplit(".", 1)[-1] in tied for name, module in model.named_modules())


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``qkv_proj``, ``gate_up_proj``, ``lm_head``, ...)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_linear(module)}


def is_linear(module: Any) -> bool:
    """A linear layer: torch's, or a quantized / adapter-wrapped one (bitsandbytes ``Linear4bit``, peft ``Linear``)."""
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")


def folder_linear_names(folder: Path) -> set[str]:
    """Leaf names of the modules holding a 2-D ``.weight`` in an HF folder's safetensors (read from the headers only)."""
    from safetensors import safe_open

    names = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as fh:
            for key in fh.keys():
                if key.endswith(".weight") and len(fh.get_slice(key).get_shape()) == 2:
                    names.add(key[: -len(".weight")].rsplit(".", 1)[-1])
    return names


def missing_lora_targets(have: set[str], targets: Iterable[str], arch: str) -> str | None:
    """One line naming the LoRA targets that are not among ``have`` (the model's linear layer names); None when all are."""
    missing = [t for t in targets if t not in have]
    if not missing:
        return None
    return f"adapter.target_modules: {arch} has no module named {', '.join(missing)} (it has {', '.join(sorted(have - {'lm_head'}))})"


def lora_target_problem(spec: str, targets: str | Iterable[str]) -> str | None:
    """Before any load: a list of LoRA targets naming modules the base lacks, as one line (None: fine or not knowable).

    An HF folder is read (its safetensors headers); a ``.gguf``, the embedded alias or a known hub id of a
    family in :data:`FAMILIES` is checked against the family's linear layer names; anything else is not knowable."""
    if isinstance(targets, str):
        return None
    path = Path(spec).expanduser()
    if is_hf_folder(path):
        have = folder_linear_names(path) - {"embed_tokens"}
        return missing_lora_targets(have, targets, base_architecture(spec).name or str(path)) if have else None
    if locate_base_model(spec).kind == "hub" and spec not in HUB_ARCHITECTURES:
        return None  # known only from the hub (network): training checks the loaded model
    arch = base_architecture(spec)
    fam = family_of(arch.gguf_arch or arch.name or "")
    if fam is None or arch.name is None:
        return None
    return missing_lora_targets(set(fam.linear_names) | {"lm_head"}, targets, arch.name)


def check_lora_targets(model: Any, targets: str | Iterable[str]) -> None:
    """A list of LoRA target modules must name linear layers the model has; one line naming those it lacks.

    ``all-linear`` is left to peft: every linear layer but the output head, fused projections included
    (Phi-3's ``qkv_proj``/``gate_up_proj``).
    """
    if isinstance(targets, str):
        return
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    problem = missing_lora_targets(linear_module_names(model), targets, arch)
    if problem:
        raise FtedgeError(problem, hint="use target_modules: all-linear, or the names of the model's linear layers")


# --------------------------------------------------------------------------- layer access
LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")  # a decoder layer's index in a parameter or module name


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def prefix_tokens(model: Any) -> int:
    """Virtual key/value positions a prefix-tuning adapter puts before every input (0 for other methods)."""
    get = getattr(model, "active_peft_config", None)
    if get is None or not getattr(get, "is_prompt_learning", False):
        return 0
    return int(get.num_virtual_tokens)


def layer_count(config: Any, setting: str) -> int:
    """Decoder layers of a model config (its text config for multimodal ones); ``setting`` names what needs it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not n:
        raise FtedgeError(f"model type {getattr(config, 'model_type', '?')}: number of layers unknown", hint=f"drop {setting}")
    return int(n)


def layer_linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers inside the decoder layers (``all-linear`` without the head), fused ones included."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if LAYER.search(name + ".") and is_linear(module)})
