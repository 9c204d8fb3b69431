"""Held-out chat prompts: what the merge drift check and the export parity gate feed a model.

Both stages take the run's frozen validation rows (``ftedge.data.splits.run_splits``) through
:func:`gate_prompts`, so the merge and export stages judge a model on the same prompts, never on a
training or test row. It lives in the data package because merge and export both use it and
stages never import each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ftedge.data.splits import Splits
from ftedge.formats.chat_template import fit_messages
from ftedge.recipe import Recipe

log = logging.getLogger(__name__)

FALLBACK_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "My card has not arrived yet. What should I do?",
    "Translate 'good morning' into Spanish.",
    "List three primary colors.",
    "How many days are in a leap year?",
    "Give me a short tip for sleeping better.",
    "What does a CPU do?",
)


@dataclass
class Prompt:
    """One chat prompt and, optionally, the answer the model was tuned to give."""

    messages: list[dict[str, str]]
    target: str | None = None

    def text(self, tokenizer: Any, *, eot: str | None = None) -> str:
        """The prompt rendered with the HF chat template, followed by its answer (and ``eot``) when known."""
        text = tokenizer.apply_chat_template(
            fit_messages(self.messages, tokenizer.chat_template), tokenize=False, add_generation_prompt=True
        )
        if self.target:
            text += self.target + (eot or "")
        return text


def gate_prompts(splits: Splits, recipe: Recipe, n: int = 16) -> list[Prompt]:
    """The first ``n`` validation rows of ``splits`` (with their answers), or fixed chat prompts when there are none."""
    prompts = [Prompt([dict(m) for m in ex.messages], ex.target) for ex in splits.val[:n]]
    if prompts:
        return prompts
    log.warning("no validation rows; the parity gate uses fixed chat prompts")
    system = recipe.data.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    return [Prompt([*head, {"role": "user", "content": text}]) for text in FALLBACK_PROMPTS[:n]]
