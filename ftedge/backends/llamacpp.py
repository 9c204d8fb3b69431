"""llama.cpp backend (llama-cpp-python, low-level API): a .gguf file; and llama.cpp's quantizer (``quantize_gguf``),
which ``ftedge export`` calls.

Uses the low-level API rather than ``llama_cpp.Llama`` for two reasons:

* logits for every position of a sequence (the parity gate compares them with PyTorch);
* the AMX trap: on CPUs that advertise AMX, ggml's AMX "extra buffer type" segfaults on
  every quantized GGUF (``ggml_backend_amx_mul_mat``). Loading with the model parameter
  ``use_extra_bufts=False`` avoids it, and ``Llama()`` does not pass that parameter through.
  ``extra_bufts_enabled`` decides; ``FTEDGE_LLAMA_EXTRA_BUFTS=0|1`` overrides the decision.

The settings that change answers are explicit, never llama.cpp's "auto": flash attention
(``flash_attn``, default off as in ``llama_cpp.Llama`` and Ollama), weight repacking into extra
buffer types (``repack``, default auto = llama.cpp's default under the AMX rule) and threads. The
target profile's ``runtime`` section sets them for the gate and the bench; ``settings`` reports them.

Every file is checked with ``ftedge.formats.gguf`` before llama.cpp sees it, so a missing or
truncated file is a one-line error, never a crash inside native code. Chat templates are rendered
by ``ftedge.formats.chat_template`` (exactly as transformers renders them).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftedge.atomic import atomic_path
from ftedge.backends.base import Backend, Sampling, sample_next
from ftedge.errors import FtedgeError, from_os_error, os_error_in
from ftedge.formats.chat_template import fit_messages, render_chat_template
from ftedge.formats.gguf import GgufInfo, inspect_gguf
from ftedge.formats.quants import GGUF_QUANT_TYPES, check_gguf_type, gguf_file_type

log = logging.getLogger(__name__)

_EXTRA_BUFTS_ENV = "FTEDGE_LLAMA_EXTRA_BUFTS"


# -- llama.cpp process-wide setup ---------------------------------------------------
_native_log = logging.getLogger("ftedge.llama_cpp")
_log_capture: list[str] | None = None


def _make_log_callback() -> Any:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", errors="replace")
        if _log_capture is not None:
            _log_capture.append(msg)
        if level in (2, 3):  # warn, error
            _native_log.debug(msg.rstrip())

    return _callback


@functools.lru_cache(maxsize=1)
def _init_llama() -> Any:
    """Initialise llama.cpp once and route its log through Python logging (quiet by default)."""
    import llama_cpp

    callback = _make_log_callback()
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return callback  # cached: the ctypes callback must stay alive


class capture_native_log:
    """Collect llama.cpp's log lines while the block runs (e.g. quantization fallbacks)."""

    def __enter__(self) -> list[str]:
        global _log_capture
        _init_llama()
        _log_capture = []
        return _log_capture

    def __exit__(self, *exc: object) -> None:
        global _log_capture
        _log_capture = None


def runtime_version() -> str:
    """The installed llama-cpp-python's version (imports it: an ImportError says it is missing or broken)."""
    import llama_cpp

    return str(llama_cpp.__version__)


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """True when ggml's CPU backend would use AMX (built with it and the CPU advertises it)."""
    import llama_cpp

    _init_llama()
    info = (llama_cpp.llama_print_system_info() or b"").decode(errors="replace")
    if "AMX_INT8 = 1" in info:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_tile" in flags or "amx_int8" in flags


def extra_bufts_enabled(info: GgufInfo, requested: bool | str = "auto") -> bool:
    """Whether to let ggml use extra buffer types (weight repacking, AMX) for this file.

    ``requested`` is the target's ``runtime.repack``: False turns them off; True and "auto" turn them on, except
    for quantized files on AMX CPUs (the segfault), which always load without. ``FTEDGE_LLAMA_EXTRA_BUFTS=0|1`` wins.
    """
    forced = os.environ.get(_EXTRA_BUFTS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if requested is False:
        return False
    return not (info.quantized and cpu_has_amx())


FLASH_ATTN_TYPES = {False: 0, True: 1, "auto": -1}  # llama_flash_attn_type: DISABLED, ENABLED, AUTO


# -- quantization ---------------------------------------------------------------------------
_FALLBACK = re.compile(r"(\S+)\s+-\s+ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)\s+->\s+falling back to\s+(\w+)")


@dataclass
class QuantReport:
    """What quantization did: the type asked for, and per-tensor fallbacks llama.cpp chose."""

    quant: str
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        by_type: dict[str, int] = {}
        for f in self.fallbacks:
            key = f"{f['wanted']}->{f['used']}"
            by_type[key] = by_type.get(key, 0) + 1
        return {"fallback_tensors": len(self.fallbacks), "fallbacks": by_type}


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> QuantReport:
    """Quantize a float GGUF to ``quant`` with llama.cpp, atomically; report per-tensor fallbacks."""
    import llama_cpp

    quant = check_gguf_type(quant)
    if quant not in GGUF_QUANT_TYPES:
        raise FtedgeError(f"{quant} is written by the converter, not by quantization")
    inspect_gguf(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_file_type(quant)
    params.nthread = threads or min(4, os.cpu_count() or 1)
    report = QuantReport(quant)
    try:
        with atomic_path(dst) as tmp, capture_native_log() as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0 or not tmp.is_file():
                text = "".join(lines)
                cause = os_error_in(text, dst.parent)  # llama.cpp's log names it, else the disk is full
                if cause is not None:
                    raise from_os_error(cause, dst)
                last = [ln for ln in text.splitlines() if "error" in ln.lower()][-1:] or [f"code {rc}"]
                raise FtedgeError(f"llama.cpp could not quantize {src.name} to {quant}: {last[0].strip()[:300]}")
            inspect_gguf(tmp)
    except OSError as err:
        raise from_os_error(err, dst) from None
    for m in _FALLBACK.finditer("".join(lines)):
        report.fallbacks.append({"tensor": m.group(1), "ncols": m.group(2), "wanted": m.group(4).lower(), "used": m.group(5).lower()})
    if report.fallbacks:
        log.info(
            "%s: %d tensors fell back from k-quants (rows not divisible by 256): %s",
            dst.name,
            len(report.fallbacks),
            report.summary()["fallbacks"],
        )
    return report


# -- the backend ------------------------------------------------------------------------
class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        n_ctx: int = 2048,
        n_batch: int = 512,
        flash_attn: bool | str = False,
        repack: bool | str = "auto",
    ) -> None:
        import llama_cpp

        self.path = Path(path)
        self.info = inspect_gguf(self.path)
        _init_llama()
        self._lib = llama_cpp
        if flash_attn not in FLASH_ATTN_TYPES or repack not in (True, False, "auto"):
            raise FtedgeError(f"llama.cpp settings: flash_attn={flash_attn!r}, repack={repack!r}", hint="use true, false or auto")
        self.flash_attn, self.repack = flash_attn, repack
        self.extra_bufts = extra_bufts_enabled(self.info, repack)
        if not self.extra_bufts and repack is not False:
            log.log(
                logging.WARNING if repack is True else logging.DEBUG,
                "%s: loading with use_extra_bufts=False (quantized GGUF on an AMX CPU)",
                self.path.name,
            )
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = self.extra_bufts
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not self._model:
            raise FtedgeError(
                f"llama.cpp cannot load {self.path}", hint="check the file is a complete GGUF of an architecture llama.cpp supports"
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        threads = threads or min(4, os.cpu_count() or 1)
        self.n_batch = min(n_batch, n_ctx)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        cparams.no_perf = True
        self.threads = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise FtedgeError(f"llama.cpp cannot create a context for {self.path} (n_ctx={n_ctx})", hint="lower n_ctx or free memory")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._stop_ids = self._find_stop_ids()

    # -- vocabulary ------------------------------------------------------------------
    def _find_stop_ids(self) -> set[int]:
        lib = self._lib
        ids = {int(t) for t in (lib.llama_vocab_eos(self._vocab), lib.llama_vocab_eot(self._vocab)) if t >= 0}
        ids.update(i for i in range(self.n_vocab) if lib.llama_vocab_is_eog(self._vocab, i))
        return ids

    @property
    def stop_ids(self) -> set[int]:
        return set(self._stop_ids)

    @property
    def context_length(self) -> int:
        return self.n_ctx

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    @property
    def settings(self) -> dict[str, Any]:
        import llama_cpp

        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": getattr(llama_cpp, "__version__", None),
            "threads": self.threads,
            "threads_batch": self.threads,
            "flash_attn": self.flash_attn,
            "repack": self.repack,
            "extra_bufts": self.extra_bufts,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_batch,
        }

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.info.metadata)

    def token_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        template = self.info.chat_template
        if not template:
            raise FtedgeError(
                f"{self.path} has no chat template in its metadata (tokenizer.chat_template)", hint="re-export it with ftedge export"
            )
        specials = {f"{kind}_token": text for kind in ("bos", "eos", "pad") if (text := self._special_text(kind))}
        chat = fit_messages(messages, template)
        return render_chat_template(template, chat, add_generation_prompt=add_generation_prompt, special_tokens=specials)

    def _special_text(self, kind: str) -> str:
        tid = self.info.token_id(kind)
        return self.token_text(tid) if tid is not None and 0 <= tid < self.n_vocab else ""

    def tokenize(self, text: str) -> list[int]:
        lib = self._lib
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
            if n < 0:
                raise FtedgeError(f"llama.cpp could not tokenize a {len(text)}-character text")
        return list(buf[:n])

    def _piece(self, token: int, *, special: bool) -> bytes:
        lib = self._lib
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_token_to_piece(self._vocab, lib.llama_token(token), buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self._piece(int(t), special=False) for t in ids).decode("utf-8", errors="replace")

    # -- inference -------------------------------------------------------------------
    def _clear(self) -> None:
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)

    def _decode(self, ids: Sequence[int], start: int, *, all_logits: bool) -> None:
        lib = self._lib
        b = self._batch
        n = len(ids)
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i] = int(tok)
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits
        b.logits[n - 1] = True
        rc = lib.llama_decode(self._ctx, b)
        if rc != 0:
            raise FtedgeError(f"llama.cpp failed to evaluate {n} tokens of {self.path.name} (code {rc})")

    def _check_len(self, n: int) -> None:
        if n == 0:
            raise FtedgeError("empty token sequence")
        if n > self.n_ctx:
            raise FtedgeError(f"{n} tokens do not fit the context of {self.n_ctx}", hint="raise n_ctx or shorten the prompt")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        self._check_len(len(ids))
        self._clear()
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode(chunk, start, all_logits=True)
            ptr = self._lib.llama_get_logits(self._ctx)
            out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
        return out

    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def generate(
        self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None
    ) -> Iterator[int]:
        ids = list(ids)
        self._check_len(len(ids))
        stops = self.stop_ids if stop_ids is None else stop_ids
        rng = sampling.rng() if sampling is not None and not sampling.greedy else None
        self._clear()
        for start in range(0, len(ids), self.n_batch):
            self._decode(ids[start : start + self.n_batch], start, all_logits=False)
        pos = len(ids)
        for _ in range(max_new_tokens):
            tok = sample_next(self._last_logits(), sampling, rng)
            yield tok
            if tok in stops or pos >= self.n_ctx:
                return
            self._decode([tok], pos, all_logits=False)
            pos += 1

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
