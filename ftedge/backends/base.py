"""The interface every runtime backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    raise FtedgeError(
        f"{path} is not a model folder (no genai_config.json or config.json)", hint="give an ORT GenAI folder, an HF folder or a .gguf file"
    )


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy (temperature 0, the default) or temperature + nucleus (top_p) sampling.

    ``seed`` makes a sampled generation reproducible; None draws fresh randomness.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise FtedgeError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise FtedgeError(f"top_p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else self.seed % 2**64)  # any integer seed, negative too


def sample_next(logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None) -> int:
    """The next token id from one row of logits: argmax when ``sampling`` is None or greedy, else a draw
    from softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches top_p."""
    if sampling is None or sampling.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise ValueError("sampling needs a random generator (Sampling.rng())")
    z = np.asarray(logits, dtype=np.float64).ravel() / sampling.temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if sampling.top_p >= 1.0:
        order, ranked = None, probs
    else:  # the nucleus: the most likely tokens until their mass reaches top_p (sorting the top 256 first, all if needed)
        order = np.argpartition(-probs, 255)[:256] if probs.size > 256 else np.arange(probs.size)
        order = order[np.argsort(-probs[order], kind="stable")]
        mass = np.cumsum(probs[order])
        if mass[-1] < sampling.top_p:
            order = np.argsort(-probs, kind="stable")
            mass = np.cumsum(probs[order])
        keep = int(np.searchsorted(mass, sampling.top_p)) + 1  # the token that crosses top_p stays in
        order = order[:keep]
        ranked = probs[order]
    cdf = np.cumsum(ranked)
    i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
    return int(i if order is None else order[i])


BATCH_TOKENS = 2048  # padded tokens per batched forward pass: the logits of one pass are BATCH_TOKENS x vocab floats
LOGIT_FLOATS = 64 * 1024 * 1024  # at most this many logits (256 MB in float32) in one batched pass, whatever the vocabulary


def batch_tokens(vocab: int, max_tokens: int = BATCH_TOKENS) -> int:
    """Padded tokens per batched pass for a model of ``vocab`` logits: ``max_tokens``, fewer for a large vocabulary
    (SmolLM2's 49k: 1,365; Gemma 3's 262k: 256), so one pass's logits stay within ``LOGIT_FLOATS``."""
    return max(1, min(max_tokens, LOGIT_FLOATS // max(vocab, 1)))


def length_batches(lengths: Sequence[int], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Row indices grouped for padded batches: sorted by length (little padding), each batch's rows x longest row at
    most ``max_tokens`` (a longer row goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def token_windows(lengths: Sequence[int], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Consecutive row indices, each window holding at most ``max_tokens`` tokens (a longer row alone): how many rows
    a caller hands ``Backend.logits_batch`` at once, so that the logits held stay bounded however many rows there are."""
    windows: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if current and total + n > max_tokens:
            windows.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        windows.append(current)
    return windows


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

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (rows of ``logits``)."""

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

    def logits_batch(self, rows: Sequence[Sequence[int]], *, start: int = 0) -> list[np.ndarray]:
        """``logits`` of each row from position ``start`` on (float32, [len(row) - start, vocab]), in the rows' order.

        This default runs one row at a time; a runtime that can run several rows in one pass (torch) overrides it
        with the same numbers within float rounding. The result holds every row's logits: callers pass a bounded
        number of rows at once (``token_windows``)."""
        return [np.asarray(self.logits(row)[start:], dtype=np.float32) for row in rows]

    @abc.abstractmethod
    def generate(
        self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None
    ) -> Iterator[int]:
        """Decoding, yielding each new token id; stops after a stop id (which is yielded) or the budget.

        Greedy when ``sampling`` is None (or has temperature 0); else each token is drawn with ``sample_next``.
        The runtime's own token-by-token loop: everything outside ``backends/`` decodes through ``stream``."""

    @property
    def settings(self) -> dict[str, object]:
        """The runtime settings that can change answers (threads, attention kernel, weight layout), for the record."""
        return {"runtime": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the runtime's resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers shared by all backends ---------------------------------------
    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize(self.apply_chat_template(messages, add_generation_prompt=True))

    def stream(
        self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None
    ) -> Reply:
        """One reply to ``ids``, decoded token by token as it is consumed (see ``Reply``): what bench, chat and serve use.

        ``stop_ids`` defaults to the artifact's own (``stop_ids``); an empty set never stops (speed runs)."""
        return Reply(self, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling)

    def reply(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256) -> str:
        """Generate one assistant turn as text (stop token removed)."""
        return self.stream(self.chat_ids(messages), max_new_tokens=max_new_tokens).text()


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.backend.detokenize(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

    def text(self) -> str:
        return self.backend.detokenize(self.ids)

    def rest(self) -> str:
        """What ``push`` held back so far (the tail of ``text()`` not yet emitted)."""
        full = self.text()
        return full[len(self.emitted) :] if full.startswith(self.emitted) else ""


class Reply:
    """One reply generated by ``Backend.generate`` (the runtime's loop), consumed token by token.

    Iterating yields each new token id of the reply; a stop token ends it and is not part of it. ``pieces()``
    yields instead, per token, the text it completes ("" while a UTF-8 sequence is incomplete). Afterwards:
    ``finish`` ("stop": a stop token ended it; "length": the budget or the context did), ``tokens`` (the reply's
    ids), ``ids`` (every id generated, the stop token included), ``text()``. Breaking off early and ``close()``
    (or ``with``) stop the runtime at once: nothing is generated that is not consumed.
    """

    def __init__(
        self,
        backend: Backend,
        ids: Sequence[int],
        *,
        max_new_tokens: int,
        stop_ids: set[int] | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        self.backend = backend
        self.stops = backend.stop_ids if stop_ids is None else set(stop_ids)
        self.tokens: list[int] = []
        self.ids: list[int] = []
        self.finish = "length"
        self._source = iter(backend.generate(ids, max_new_tokens=max_new_tokens, stop_ids=self.stops, sampling=sampling))
        self._decoder = StreamDecoder(backend)

    def __iter__(self) -> Iterator[int]:
        try:
            for token in self._source:
                self.ids.append(token)
                if token in self.stops:
                    self.finish = "stop"
                    return
                self.tokens.append(token)
                yield token
        finally:
            self.close()

    def pieces(self) -> Iterator[str]:
        """Per new token, the text it completes (incomplete UTF-8 held back: ``rest()`` has it once the reply ends)."""
        decoder = self._decoder
        for token in self:
            yield decoder.push(token)

    def rest(self) -> str:
        """The text ``pieces()`` held back (an incomplete UTF-8 sequence at the end)."""
        return self._decoder.rest()

    def run(self) -> Reply:
        """Generate what is not generated yet (to the stop token or the budget); returns the reply."""
        for _ in self:
            pass
        return self

    def text(self) -> str:
        """The whole reply as text (generating what is not generated yet)."""
        return self.backend.detokenize(self.run().tokens)

    def close(self) -> None:
        """Stop the runtime's loop (a generator is closed; a plain iterator is simply dropped)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
