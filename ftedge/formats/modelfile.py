"""Ollama ``Modelfile`` for a GGUF: FROM, TEMPLATE (Go template), SYSTEM, stop parameters.

The TEMPLATE is derived from the GGUF's own Jinja chat template by rendering it with sentinel
messages and cutting out each role's prefix and suffix, so it reproduces the template the model
was tuned with (ChatML, Llama 3, ...). Stops are the texts of the GGUF's EOS / end-of-turn tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ftedge import atomic
from ftedge.errors import FtedgeError
from ftedge.formats.chat_template import render_chat_template
from ftedge.formats.gguf import GgufInfo, inspect_gguf

log = logging.getLogger(__name__)

_S, _U, _A, _U2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01US2\x01"


def _split(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ValueError(sentinel)
    a, b = text.split(sentinel)
    return a, b


def go_template(chat_template: str, *, bos: str = "", eos: str = "") -> tuple[str, str | None]:
    """(Ollama Go template, default system prompt the Jinja template injects or None)."""

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
        return render_chat_template(chat_template, msgs, add_generation_prompt=gen, special_tokens=specials)

    sys_m, usr, ast, usr2 = (
        {"role": "system", "content": _S},
        {"role": "user", "content": _U},
        {"role": "assistant", "content": _A},
        {"role": "user", "content": _U2},
    )
    t_su = render([sys_m, usr], False)
    t_sug = render([sys_m, usr], True)
    t_sua = render([sys_m, usr, ast], False)
    t_suau = render([sys_m, usr, ast, usr2], False)
    if not (t_sug.startswith(t_su) and t_sua.startswith(t_su) and t_suau.startswith(t_sua)):
        raise ValueError("template is not incremental")
    gen = t_sug[len(t_su) :]
    ap, as_ = _split(t_sua[len(t_su) :], _A)
    up, us = _split(t_suau[len(t_sua) :], _U2)
    sp, rest = _split(t_su, _S)
    between, us_check = _split(rest, _U)
    if us_check != us or not between.endswith(up):
        raise ValueError("user turns render differently")
    ss = between[: len(between) - len(up)]
    default_system = None
    t_u = render([usr], False)
    if _U in t_u and t_u.startswith(sp) and t_u.count(ss) and not t_u.startswith(up):
        head = t_u.split(_U)[0]
        if head.startswith(sp) and head.endswith(ss + up):
            default_system = head[len(sp) : len(head) - len(ss + up)] or None
    tmpl = (
        '{{- range .Messages }}{{ if eq .Role "system" }}'
        + sp
        + "{{ .Content }}"
        + ss
        + '{{ else if eq .Role "user" }}'
        + up
        + "{{ .Content }}"
        + us
        + '{{ else if eq .Role "assistant" }}'
        + ap
        + "{{ .Content }}"
        + as_
        + "{{ end }}{{ end }}"
        + gen
    )
    return tmpl, default_system


def modelfile_text(info: GgufInfo, *, model_ref: str, system: str | None = None) -> tuple[str, list[str]]:
    """Text of the Modelfile and its stop strings."""
    stops = info.stop_texts
    bos_text = info.special_texts.get("bos", "")
    lines = [f"FROM {model_ref}"]
    template = info.chat_template
    if template:
        try:
            tmpl, default_system = go_template(template, bos=bos_text, eos=stops[-1] if stops else "")
            if '"""' in tmpl:
                raise ValueError("triple quotes")
            lines.append(f'TEMPLATE """{tmpl}"""')
            system = system if system is not None else default_system
        except (ValueError, FtedgeError) as err:
            log.warning("%s: chat template not convertible to an Ollama TEMPLATE (%s); Ollama will use the GGUF's own", info.path.name, err)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n", stops


def write_modelfile(gguf_path: Path, out: Path, *, system: str | None = None, model_ref: str | None = None) -> list[str]:
    """Write an Ollama Modelfile for ``gguf_path`` to ``out`` (atomically); return the stop strings."""
    info = inspect_gguf(gguf_path)
    text, stops = modelfile_text(info, model_ref=model_ref or f"./{Path(gguf_path).name}", system=system)
    atomic.write_text(Path(out), text)
    return stops
