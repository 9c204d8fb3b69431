"""THE loader: a base model onto disk, and any model folder into memory, the same way for every stage.

- Base-model resolution (:func:`resolve_base_model`): an alias, a local HF folder, a hub id or a
  ``.gguf`` file (the rules: :mod:`ftedge.basemodel`), always to a local HF folder with safetensors
  weights. A ``.gguf`` is dequantized once into ``$FTEDGE_CACHE`` (default ``~/.cache/ftedge``) and
  reused; the cache entry is built in a temp folder under a file lock and renamed into place, so
  concurrent users never see a half-written model.
- The one model loader (:func:`load_causal_lm`): float, or 4-bit NF4/FP4 through bitsandbytes
  (:func:`bnb_config`), with one compute-dtype rule (:func:`compute_dtype`). Training, merge and
  the PyTorch runtime all load through it, so "the model that was trained" is the same everywhere.
- The tokenizer (:func:`load_tokenizer`) and the one a model is trained with
  (:func:`training_tokenizer`: the trained chat template); a PEFT adapter on a loaded model
  (:func:`attach_adapter`); a folder's tokenizer files copied as they are (:func:`copy_tokenizer_files`).
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftedge import atomic
from ftedge.basemodel import cache_dir, locate_base_model
from ftedge.errors import FtedgeError, from_os_error
from ftedge.families import end_of_turn_id, end_of_turn_token, tied_embeddings
from ftedge.formats.chat_template import builtin_chat_templates, read_chat_template, trained_chat_template

if TYPE_CHECKING:
    import torch

    from ftedge.recipe import QuantConfig

log = logging.getLogger(__name__)

COMPLETE_MARKER = "ftedge-model.json"


def resolve_base_model(spec: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Return a local HF folder (safetensors) for an alias, folder, .gguf file or hub id (:func:`ftedge.basemodel.locate_base_model`)."""
    source = locate_base_model(spec)
    if source.kind == "hub":
        return download_from_hub(source.spec)
    assert source.path is not None
    return source.path if source.kind == "folder" else gguf_to_hf(source.path)


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
    missing = [k for k in missing if not (tied_embeddings(config) and k == "lm_head.weight")]
    if missing or unexpected:
        raise FtedgeError(f"{gguf_path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied_embeddings(config):
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
