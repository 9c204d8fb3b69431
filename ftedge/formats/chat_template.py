"""Chat-template rendering exactly as transformers renders it, for runtimes that are not transformers.

A GGUF or an ORT GenAI folder carries the model's Jinja chat template; llama.cpp's and ORT
GenAI's own renderers differ from transformers' in details (``strftime_now``, ``raise_exception``,
``tojson``, namespaces, whitespace control). ftedge renders every template with transformers'
own renderer (``render_jinja_template``: the same sandbox, globals and filters), passing the
special-token texts a tokenizer would (``bos_token``, ``eos_token``, ...), so every runtime gets
the prompt the model was tuned on.

The template rules live here too: where a model folder keeps its template
(:func:`folder_chat_template`, :func:`write_chat_template`, :func:`read_tokenizer_config`), the
built-in templates of the common chat formats (:func:`read_chat_template`), the trained template
(:func:`trained_chat_template`: Qwen3's thinking off), and templates without a system role
(:func:`fit_messages` folds the system prompt into the first user turn, as Gemma 3's own template does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
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


# --------------------------------------------------------------------------- a model folder's template
def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``tokenizer_config.json`` ({} when it has none); a one-line error when it is not a JSON object."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FtedgeError(f"{path} cannot be read as JSON ({err})", hint="fix or replace the model's tokenizer files") from None
    if not isinstance(cfg, dict):
        raise FtedgeError(f"{path} is not a JSON object", hint="fix or replace the model's tokenizer files")
    return cfg


def folder_chat_template(folder: Path) -> str | None:
    """The chat template of a model folder's tokenizer files, where transformers' tokenizer finds it:
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (None when there is none;
    a processor's ``chat_template.json`` is not a tokenizer's)."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) else None


def write_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer files in ``folder``, for every reader.

    transformers reads ``chat_template.jinja`` first, llama.cpp's converter ``tokenizer_config.json``'s
    ``chat_template`` first: both are written with the same text (``chat_template.json`` is dropped).
    """
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg = read_tokenizer_config(folder)
    if "chat_template" in cfg:
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- template rules
TEMPLATES_DIR = Path(__file__).parent.parent / "templates"  # package data: ftedge's own templates of the common chat formats
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


def has_thinking_switch(template: str) -> bool:
    """Whether ``template`` renders thinking on or off by ``enable_thinking`` (Qwen3's)."""
    return "enable_thinking" in template


def trained_chat_template(template: str) -> str:
    """The template a fine-tuned model is trained and shipped with: ``template``, thinking off by default (Qwen3)."""
    if has_thinking_switch(template) and not template.startswith(THINKING_OFF):
        return THINKING_OFF + template
    return template


@lru_cache(maxsize=32)
def system_role_supported(template: str) -> bool:
    """Whether ``template`` renders a leading system message (Gemma 2's raises; some drop it)."""
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
