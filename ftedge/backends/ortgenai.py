"""onnxruntime-genai backend: an ORT GenAI folder (genai_config.json, model.onnx, tokenizer, chat template).

The thread count goes into the decoder's session options through ``og.Config.overlay`` at load
time, so the artifact on disk is never modified.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ftedge.backends.base import Backend, Sampling, sample_next
from ftedge.errors import FtedgeError
from ftedge.formats.chat_template import fit_messages, folder_chat_template, read_tokenizer_config

log = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1].strip() if text else type(err).__name__


def read_genai_config(path: Path) -> dict:
    """The folder's genai_config.json, or a one-line error if the folder is not an ORT GenAI model."""
    cfg_path = Path(path) / "genai_config.json"
    if not Path(path).is_dir() or not cfg_path.is_file():
        raise FtedgeError(f"{path} is not an ORT GenAI model folder (no genai_config.json)", hint="give a folder made by `ftedge export`")
    try:
        cfg = json.loads(cfg_path.read_text())
        decoder = cfg["model"]["decoder"]
    except (ValueError, KeyError, TypeError) as err:
        raise FtedgeError(f"{cfg_path} is not a valid ORT GenAI config ({_first_line(err)})", hint="re-export the model") from None
    onnx_file = Path(path) / decoder.get("filename", "model.onnx")
    if not onnx_file.is_file():
        raise FtedgeError(f"{path} is an incomplete ORT GenAI folder ({onnx_file.name} missing)", hint="re-export the model")
    return cfg


def runtime_version() -> str:
    """The installed onnxruntime-genai's version (imports it: an ImportError says it is missing or broken)."""
    import onnxruntime_genai as og

    return str(og.__version__)


@functools.lru_cache(maxsize=1)
def builder_architectures() -> frozenset[str]:
    """HF architectures onnxruntime-genai's model builder accepts (read from the installed builder's source, without
    importing it); empty when onnxruntime-genai is not installed."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    builder = Path(list(spec.submodule_search_locations)[0]) / "models" / "builder.py"
    text = builder.read_text(encoding="utf-8") if builder.is_file() else ""
    return frozenset(re.findall(r'config\.architectures\[0\] == "(\w+)"', text))


class OrtGenAIBackend(Backend):
    name = "ortgenai"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        self.path = Path(path)
        self.threads = threads
        self._cfg = read_genai_config(self.path)
        self._og = og
        try:
            config = og.Config(str(self.path))
            if threads:
                opts = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as err:  # the runtime raises plain RuntimeError with its own message
            raise FtedgeError(f"cannot load ORT GenAI model {self.path}: {_first_line(err)}", hint="re-export the model") from None
        self._context_length = int(self._cfg["model"].get("context_length") or self._cfg.get("search", {}).get("max_length") or 2048)
        window = self._cfg["model"]["decoder"].get("sliding_window") or {}
        self._window = int(window.get("window_size") or 0) if isinstance(window, dict) else 0
        self._template = folder_chat_template(self.path)

    @property
    def settings(self) -> dict:
        return {"runtime": "onnxruntime-genai", "threads": self.threads}

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return int(self._cfg["model"]["vocab_size"])

    # -- tokens -----------------------------------------------------------------
    @property
    def stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self._cfg["model"].get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
        ids.update(int(i) for i in np.asarray(self.tokenizer.eos_token_ids).ravel())
        eos_text = read_tokenizer_config(self.path).get("eos_token")
        if isinstance(eos_text, dict):
            eos_text = eos_text.get("content")
        if isinstance(eos_text, str):
            tid = int(self.tokenizer.to_token_id(eos_text))
            if tid >= 0:
                ids.add(tid)
        return {i for i in ids if i >= 0}

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        kwargs: dict = {"add_generation_prompt": add_generation_prompt}
        if self._template is not None:
            kwargs["template_str"] = self._template
        chat = fit_messages(messages, self._template)
        try:
            return self.tokenizer.apply_chat_template(json.dumps(chat), **kwargs)
        except Exception as err:
            raise FtedgeError(
                f"{self.path}: cannot apply the chat template ({_first_line(err)})",
                hint="export a model whose tokenizer has a chat template",
            ) from None

    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(list(ids), dtype=np.int32)) if len(ids) else ""

    # -- compute ----------------------------------------------------------------
    def _generator(self, n_prompt: int, n_new: int):
        og = self._og
        if n_prompt == 0:
            raise FtedgeError("empty prompt: nothing to run the model on")
        max_length = n_prompt + max(n_new, 1)
        if max_length > self.context_length:
            raise FtedgeError(f"{n_prompt} prompt tokens + {n_new} new exceed the context length {self.context_length} of {self.path}")
        # a sliding-window model (Gemma 2/3) needs a KV cache of at least the window
        max_length = min(max(max_length, self._window), self.context_length)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(self.model, params)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        gen = self._generator(len(ids), 1)
        try:
            gen.append_tokens(np.asarray(ids, dtype=np.int32))
            out = np.asarray(gen.get_output("logits"))
        finally:
            del gen
        out = out.reshape(-1, out.shape[-1])
        if out.shape[0] != len(ids):
            raise FtedgeError(
                f"{self.path}: the model returned logits for {out.shape[0]} of {len(ids)} positions", hint="re-export without prune_lm_head"
            )
        return out.astype(np.float32, copy=True)

    def generate(
        self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None
    ) -> Iterator[int]:
        stops = self.stop_ids if stop_ids is None else stop_ids
        if max_new_tokens <= 0:
            return
        if sampling is not None and not sampling.greedy:
            yield from self._generate_sampled(ids, max_new_tokens, stops, sampling)
            return
        gen = self._generator(len(ids), max_new_tokens)
        try:
            gen.append_tokens(np.asarray([int(i) for i in ids], dtype=np.int32))
            for _ in range(max_new_tokens):
                if gen.is_done():
                    return
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                yield tok
                if tok in stops:
                    return
        finally:
            del gen

    def _generate_sampled(self, ids: Sequence[int], max_new_tokens: int, stops: set[int], sampling: Sampling) -> Iterator[int]:
        """Sampling with ftedge's own ``sample_next`` on the runtime's logits (one append per token)."""
        rng = sampling.rng()
        gen = self._generator(len(ids), max_new_tokens)
        try:
            gen.append_tokens(np.asarray([int(i) for i in ids], dtype=np.int32))
            for i in range(max_new_tokens):
                logits = np.asarray(gen.get_output("logits"))
                tok = sample_next(logits.reshape(-1, logits.shape[-1])[-1], sampling, rng)
                yield tok
                if tok in stops or i == max_new_tokens - 1:
                    return
                gen.append_tokens(np.asarray([tok], dtype=np.int32))
        finally:
            del gen

    def close(self) -> None:
        self.tokenizer = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
