"""The interface every runtime backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ftedge.errors import FtedgeError
from ftedge.formats.gguf import GGUF_MAGIC


def detect_format(path: Path) -> str:
    """'gguf', 'onnx' (ORT GenAI folder), 'hf' (transformers folder); raise a one-line error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FtedgeError(f"{path} not found", hint="give a .gguf file, an ORT GenAI folder or a run folder")
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        raise FtedgeError(f"{path} is not a GGUF file (bad magic {magic!r})", hint="give a complete .gguf file")
    if (path / "genai_config.json").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "hf"
    raise FtedgeError(f"{path} is not a model folder (no genai_config.json or config.json)", hint="give an ORT GenAI folder, an HF folder or a .gguf file")


class Backend(abc.ABC):
    """Load, tokenize with the chat template, next-token logits, greedy streaming generation.

    Token ids are the artifact's own; all ftedge artifacts of one model share one vocabulary,
    so logits of different backends can be compared position by position.
    """

    name: str = "base"
    path: Path

    @property
    @abc.abstractmethod
    def stop_ids(self) -> set[int]:
        """Token ids that end a turn (EOS, end-of-turn)."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Tokens the loaded artifact holds at once (prompt + generated)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the artifact's own chat template."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of already-templated text (special tokens parsed, no BOS added)."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""

    @abc.abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits, shape [len(ids), vocab]: row i predicts token i+1."""

    @abc.abstractmethod
    def generate(self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None) -> Iterator[int]:
        """Greedy decoding, yielding each new token id; stops after a stop id (which is yielded) or the budget."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the runtime's resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers shared by all backends ---------------------------------------
    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize(self.apply_chat_template(messages, add_generation_prompt=True))

    def reply(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256) -> str:
        """Generate one assistant turn as text (stop token removed)."""
        stops = self.stop_ids
        out = [t for t in self.generate(self.chat_ids(messages), max_new_tokens=max_new_tokens, stop_ids=stops) if t not in stops]
        return self.detokenize(out)
