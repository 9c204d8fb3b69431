"""Tokenized, loss-masked rows: a tokenizer's chat template applied to :class:`~ftedge.data.reading.Example` rows.

:class:`ChatEncoder` applies the base tokenizer's chat template and marks which tokens carry
loss: only assistant tokens, their end-of-turn token included (so exported models stop).
Over-long rows are truncated, counted and reported in one warning: the end of the user text
goes first (the system prompt, the template's assistant header and the answer stay), then the
end of the row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ftedge.data.reading import Example
from ftedge.data.splits import Splits, load_splits
from ftedge.errors import FtedgeError
from ftedge.families import end_of_turn_token
from ftedge.formats.chat_template import fit_messages, trained_chat_template
from ftedge.recipe import Recipe

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Encoded:
    """A tokenized example: ``labels[i]`` is the token at ``i`` if trained there, else -100."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodedPair:
    """A tokenized preference example: the prompt with the chosen answer, and with the rejected one."""

    chosen: Encoded
    rejected: Encoded


class _NotIncremental(Exception):
    """The template renders a conversation differently from its prefix (Qwen3, Phi-4-mini)."""


class ChatEncoder:
    """Applies a tokenizer's chat template and masks everything but the assistant's tokens.

    The template is the trained one (``ftedge.formats.chat_template.trained_chat_template``: Qwen3's thinking off) and
    a system prompt is folded into the first user turn where the template has no system role
    (``ftedge.formats.chat_template.fit_messages``, Gemma 2).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        template = getattr(tokenizer, "chat_template", None)
        self.template = trained_chat_template(template) if isinstance(template, str) else template
        self.eot = end_of_turn_token(tokenizer)
        self.truncated = 0
        self.dropped = 0
        self._tail = self._prompt_tail_tokens()

    def _prompt_tail_tokens(self) -> int:
        """Tokens after the last user message's text in a generation prompt (kept when truncating)."""
        text = self._render([{"role": "user", "content": "\x00END\x00"}], generation=True)
        return len(self._ids(text.split("\x00END\x00", 1)[-1]))

    def _render(self, messages: Sequence[dict[str, str]], *, generation: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                fit_messages(messages, self.template), chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        except TemplateError as err:
            raise FtedgeError(
                f"the base model's chat template refuses a training conversation ({err})",
                hint="check the roles of the data's messages (many templates need user/assistant turns to alternate)",
            ) from None

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a generation prompt (what inference feeds the model)."""
        return self._ids(self._render(messages, generation=True))

    def pieces(self, example: Example) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trained)`` pieces.

        Each assistant turn is found as the text between the generation prompt before it and the
        conversation up to it, when the template renders every conversation as a prefix of its
        continuation (ChatML, Llama 3, Gemma); otherwise (Qwen3 drops earlier think blocks,
        Phi-4-mini ends a finished conversation with eos) each answer is located in order in the
        rendered whole conversation.
        """
        if example.raw:
            eos = getattr(self.tok, "eos_token", None) or ""
            return [(example.target + eos, True)]
        conv = example.conversation()
        try:
            return self._incremental_pieces(conv)
        except _NotIncremental:
            return self._located_pieces(conv)

    def _trained_part(self, answer: str, content: str) -> tuple[str, str]:
        """``answer`` split after its end-of-turn token (the part trained, the rest)."""
        cut = answer.find(self.eot, len(content.rstrip()) // 2) if self.eot else -1
        if cut >= 0:
            return answer[: cut + len(self.eot or "")], answer[cut + len(self.eot or "") :]
        return answer + (getattr(self.tok, "eos_token", None) or ""), ""

    def _incremental_pieces(self, conv: list[dict[str, str]]) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        done = ""
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            before = self._render(conv[:i], generation=True)
            full = self._render(conv[: i + 1])
            if not before.startswith(done) or not full.startswith(before):
                raise _NotIncremental
            trained, rest = self._trained_part(full[len(before) :], msg["content"])
            out += [(before[len(done) :], False), (trained, True)]
            if i < len(conv) - 1:
                out.append((rest, False))
            done = full
        return [(t, flag) for t, flag in out if t]

    def _located_pieces(self, conv: list[dict[str, str]]) -> list[tuple[str, bool]]:
        text = self._render(conv)
        out: list[tuple[str, bool]] = []
        cursor = emitted = 0
        for msg in fit_messages(conv, self.template):
            content = str(msg["content"]).strip()
            at = text.find(content + (self.eot or ""), cursor) if msg["role"] == "assistant" and self.eot else -1
            if at < 0:
                at = text.find(content, cursor)
            if at < 0:
                raise FtedgeError(
                    "the base model's chat template does not render a message's text as given, so assistant tokens cannot be located",
                    hint="use a base model with a standard chat template (e.g. ChatML or Llama-3), or set the recipe's chat_template",
                )
            cursor = at + len(content)
            if msg["role"] == "assistant":
                end = text.find(self.eot, cursor) if self.eot else -1
                if end >= 0 and not text[cursor:end].strip():  # the end-of-turn token right after the answer
                    cursor = end + len(self.eot or "")
                out += [(text[emitted:at], False), (text[at:cursor], True)]
                emitted = cursor
        return [(t, flag) for t, flag in out if t]

    def encode(self, example: Example) -> Encoded | None:
        """Token ids and labels, truncated to ``max_length``; None if no trained token would remain."""
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.pieces(example):
            piece = self._ids(text)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = self._truncate(ids, labels)
        if not any(x != IGNORE for x in labels[1:]):
            self.dropped += 1
            return None
        labels[0] = IGNORE  # nothing predicts an example's first token (and in a packed row it must not)
        return Encoded(ids, labels)

    def n_tokens(self, examples: Sequence[Example]) -> list[int]:
        """Tokens of each rendered example before any truncation (a preference row: its longer answer), as ``encode`` counts them."""
        variants = [[e] if e.rejected is None else [e, replace(e, target=e.rejected)] for e in examples]
        pieces = [[[text for text, _ in self.pieces(x)] for x in v] for v in variants]
        texts = [text for v in pieces for x in v for text in x]
        lengths = iter(len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        return [max(sum(next(lengths) for _ in x) for x in v) for v in pieces]

    def encode_pair(self, example: Example) -> EncodedPair | None:
        """A preference example as two encoded rows (chosen, rejected); None if either has no trained token left."""
        if example.rejected is None:
            raise FtedgeError(f"{example.source}: not a preference row (no rejected answer)", hint="set data.format: preference")
        chosen = self.encode(example)
        rejected = self.encode(replace(example, target=example.rejected))
        return None if chosen is None or rejected is None else EncodedPair(chosen, rejected)

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Drop the end of the text before the first answer (keeping the template's tail), then the row's end."""
        over = len(ids) - self.max_length
        first = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
        cut_end = max(0, first - self._tail)
        cut_start = max(0, cut_end - over)
        ids, labels = ids[:cut_start] + ids[cut_end:], labels[:cut_start] + labels[cut_end:]
        return ids[: self.max_length], labels[: self.max_length]

    def encode_all(self, examples: Iterable[Example], *, what: str = "train", pairs: bool = False) -> list[Any]:
        """Encoded rows (``pairs``: EncodedPair of preference rows); truncations reported in one warning."""
        before_t, before_d = self.truncated, self.dropped
        out = [e for e in map(self.encode_pair if pairs else self.encode, examples) if e is not None]
        trunc, drop = self.truncated - before_t, self.dropped - before_d
        if trunc:
            log.warning(
                "%s: %d row%s longer than max_length=%d tokens were truncated%s",
                what,
                trunc,
                "s" if trunc > 1 else "",
                self.max_length,
                f" ({drop} dropped: no answer token left)" if drop else "",
            )
        if not out and (trunc or drop):
            raise FtedgeError(
                f"{what}: no row fits max_length={self.max_length} tokens with its answer",
                hint="raise train.max_length or shorten the system prompt",
            )
        return out


def check_fits(encoder: ChatEncoder, examples: Sequence[Example]) -> None:
    """A max_length below the fixed prompt (system + template) cannot hold any answer: say so."""
    chat = next((e for e in examples if not e.raw), None)
    if chat is None:
        return
    fixed = len(encoder.prompt_ids([*(m if m["role"] == "system" else {**m, "content": ""} for m in chat.messages)]))
    if fixed + 1 >= encoder.max_length:
        raise FtedgeError(
            f"train.max_length={encoder.max_length} is smaller than the prompt ({fixed} tokens of system prompt and chat template)",
            hint="raise train.max_length or shorten data.system_prompt",
        )


def tokenized_splits(recipe: Recipe, tokenizer: Any, splits: Splits | None = None) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenized, masked training and validation rows for a recipe (the training stage's input).

    Preference data (``data.format: preference``) gives :class:`EncodedPair` rows instead.
    """
    splits = splits or load_splits(recipe)
    enc = ChatEncoder(tokenizer, recipe.train.max_length)
    check_fits(enc, splits.train)
    pairs = recipe.data.format == "preference"
    return enc.encode_all(splits.train, what="train", pairs=pairs), enc.encode_all(splits.val, what="val", pairs=pairs)
