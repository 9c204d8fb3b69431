"""Chat-template rendering exactly as transformers renders it, for runtimes that are not transformers.

A GGUF or an ORT GenAI folder carries the model's Jinja chat template; llama.cpp's and ORT
GenAI's own renderers differ from transformers' in details (``strftime_now``, ``raise_exception``,
``tojson``, namespaces, whitespace control). ftedge renders every template with transformers'
own renderer (``render_jinja_template``: the same sandbox, globals and filters), passing the
special-token texts a tokenizer would (``bos_token``, ``eos_token``, ...), so every runtime gets
the prompt the model was tuned on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ftedge.errors import FtedgeError


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

    ``special_tokens`` maps ``bos_token`` / ``eos_token`` / ... to their texts (a tokenizer's
    ``special_tokens_map``); ``kwargs`` are extra template variables (e.g. ``enable_thinking``).
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    variables = {**(special_tokens or {}), **kwargs}
    try:
        rendered, _ = render_jinja_template(
            conversations=[[dict(m) for m in messages]],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except TemplateError as err:
        raise FtedgeError(f"the chat template cannot render these messages ({err})", hint="check the messages' roles and order") from None
    return rendered[0]
