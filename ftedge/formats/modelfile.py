"""Ollama ``Modelfile`` for a GGUF: FROM, TEMPLATE (Go template), SYSTEM, stop parameters.

The TEMPLATE is derived from the GGUF's own Jinja chat template by rendering probe chats (ending on
a user turn, with the generation prompt, as inference renders them) with sentinel messages and
cutting out the literal pieces around each message (:class:`ChatPieces`), so it reproduces the
template the model was tuned with: ChatML, Qwen3 (thinking off), Llama 3 (its system header is
rendered without a system message too; the date line is the export date, as Ollama's templates
cannot format today's date that way), Gemma (system prompt opening the first user turn), Phi.
A template the pieces cannot reproduce gets no TEMPLATE (Ollama then picks its own) and a warning.
Stops are the texts of the GGUF's EOS / end-of-turn tokens.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ftedge import atomic
from ftedge.errors import FtedgeError
from ftedge.formats.chat_template import render_chat_template
from ftedge.formats.gguf import GgufInfo, inspect_gguf

log = logging.getLogger(__name__)

_S, _U1, _A1, _U2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01US2\x01"


@dataclass(frozen=True)
class ChatPieces:
    """A chat template as literal pieces around each message, as Ollama's Go template renders it.

    ``head``, then ``default`` (a system block the template renders when a chat has no system
    message: Llama 3's date header, Qwen2.5's default system prompt; None if it renders none),
    then per message ``system``/``user``/``assistant`` (prefix, suffix) pairs (``user_after_system``:
    the user prefix right after a system message, empty where the system prompt opens the first
    user turn as in Gemma), then ``generation`` (the assistant header of the reply).
    """

    head: str
    default: str | None
    system: tuple[str, str]
    user: tuple[str, str]
    user_after_system: str
    assistant: tuple[str, str]
    generation: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for ``messages`` (the emulation the pieces are checked with)."""
        out = [self.head]
        prev = ""
        if self.default is not None and not (messages and messages[0]["role"] == "system"):
            out.append(self.system[0] + self.default + self.system[1])
            prev = "system"
        for m in messages:
            role = m["role"]
            if role == "user":
                prefix = self.user_after_system if prev == "system" else self.user[0]
                out.append(prefix + m["content"] + self.user[1])
            elif role in ("system", "assistant"):
                pre, suf = getattr(self, role)
                out.append(pre + m["content"] + suf)
            prev = role
        return "".join(out) + self.generation

    def go(self) -> str:
        """The Ollama Go template (``{{`` never appears in a piece; no whitespace trimming next to them)."""
        sp, ss = self.system
        track = self.user_after_system != self.user[0]  # Gemma: the user turn after a system prompt has no prefix of its own
        default = ""
        if self.default is not None:
            default = '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}' + sp + self.default + ss
            default += ('{{ $prev = "system" }}' if track else "") + "{{ end }}"
        user = self.user[0]
        if track:
            user = f'{{{{ if eq $prev "system" }}}}{self.user_after_system}{{{{ else }}}}{self.user[0]}{{{{ end }}}}'
        return (
            self.head
            + ('{{ $prev := "" }}' if track else "")
            + default
            + "{{ range .Messages }}"
            + f'{{{{ if eq .Role "system" }}}}{sp}{{{{ .Content }}}}{ss}'
            + f'{{{{ else if eq .Role "user" }}}}{user}{{{{ .Content }}}}{self.user[1]}'
            + f'{{{{ else if eq .Role "assistant" }}}}{self.assistant[0]}{{{{ .Content }}}}{self.assistant[1]}'
            + "{{ end }}"
            + ("{{ $prev = .Role }}" if track else "")
            + "{{ end }}"
            + self.generation
        )


def _segments(text: str, sentinels: list[str]) -> list[str]:
    """``text`` cut at each sentinel (each must appear once, in order)."""
    out = []
    for s in sentinels:
        if text.count(s) != 1:
            raise ValueError(f"the template does not render each message's text once ({s!r})")
        before, text = text.split(s)
        out.append(before)
    return [*out, text]


def _after_end_of_turn(text: str, eot: str) -> int:
    """Where ``text`` continues after its first end-of-turn token and the newlines after it (len(text) without one)."""
    at = text.find(eot) if eot else -1
    if at < 0:
        return len(text)
    end = at + len(eot)
    while end < len(text) and text[end] == "\n":
        end += 1
    return end


def chat_pieces(chat_template: str, *, bos: str = "", eos: str = "", end_of_turn: str = "") -> ChatPieces:
    """The pieces of ``chat_template`` from renders of probe chats ending on a user turn (as inference renders them).

    Rendered as every ftedge runtime renders (``ftedge.formats.chat_template.fit_messages``: a system prompt folded into the
    first user turn where the template has no system role). Raises ValueError when the template renders
    something the pieces cannot express; the result is checked against the template on several chats.
    """
    from ftedge.formats.chat_template import fit_messages

    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}

    def render(msgs: list[dict[str, str]]) -> str:
        return render_chat_template(chat_template, fit_messages(msgs, chat_template), add_generation_prompt=True, special_tokens=specials)

    s, u1, a1, u2 = ({"role": r, "content": c} for r, c in (("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)))
    x0, x1, x2, x3, x4 = _segments(render([s, u1, a1, u2]), [_S, _U1, _A1, _U2])
    y0, y2, y3, y4 = _segments(render([u1, a1, u2]), [_U1, _A1, _U2])
    w0, w1, w4 = _segments(render([s, u1]), [_S, _U1])
    z0, z4 = _segments(render([u1]), [_U1])
    if (y2, y3) != (x2, x3) or not x4 == y4 == w4 == z4 or (w0, w1, z0) != (x0, x1, y0):
        raise ValueError("the template renders a message differently depending on what follows it")
    # user suffix + assistant header (x2) and user suffix + generation header (x4): cut after the end-of-turn token
    common = 0
    while common < min(len(x2), len(x4)) and x2[common] == x4[common]:
        common += 1
    us = x2[: min(common, _after_end_of_turn(x2, end_of_turn))]
    ap, gen = x2[len(us) :], x4[len(us) :]
    if y0.startswith(x0) and y0.endswith(x1) and len(y0) >= len(x0) + len(x1):  # a default system block without a system message
        default: str | None = y0[len(x0) : len(y0) - len(x1)]
        head = bos if bos and x0.startswith(bos) else ""
        up = x3[_after_end_of_turn(x3, end_of_turn) :]
    else:  # none: the chat starts with a head (bos) and the first user turn
        found = next((y0[:n] for n in range(len(y0) + 1) if x0.startswith(y0[:n]) and x3.endswith(y0[n:])), None)
        if found is None:
            raise ValueError("the template renders the start of a chat in a way the Go template cannot follow")
        head, default, up = found, None, y0[len(found) :]
    if not x3.endswith(up):
        raise ValueError("user turns render differently after an assistant turn")
    ups = up if x1.endswith(up) else ""
    pieces = ChatPieces(
        head=head,
        default=default,
        system=(x0[len(head) :], x1[: len(x1) - len(ups)]),
        user=(up, us),
        user_after_system=ups,
        assistant=(ap, x3[: len(x3) - len(up)]),
        generation=gen,
    )
    probes = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"},
        ],
    ]
    for chat in probes:
        if pieces.render(chat) != render(chat):
            raise ValueError("the Go template would render a chat differently")
    if any(
        "{{" in piece or "}}" in piece for piece in (pieces.head, pieces.default or "", *pieces.system, *pieces.user, *pieces.assistant)
    ):
        raise ValueError("the template's text holds {{ or }}")
    return pieces


def go_template(chat_template: str, *, bos: str = "", eos: str = "", end_of_turn: str = "") -> tuple[str, str | None]:
    """(Ollama Go template, default system prompt for the Modelfile or None: a default system block is in the template)."""
    return chat_pieces(chat_template, bos=bos, eos=eos, end_of_turn=end_of_turn).go(), None


def modelfile_text(info: GgufInfo, *, model_ref: str, system: str | None = None) -> tuple[str, list[str]]:
    """Text of the Modelfile and its stop strings."""
    stops = info.stop_texts
    bos_text = info.special_texts.get("bos", "")
    lines = [f"FROM {model_ref}"]
    template = info.chat_template
    if template:
        try:
            tmpl, default_system = go_template(
                template, bos=bos_text, eos=info.special_texts.get("eos", ""), end_of_turn=stops[0] if stops else ""
            )
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


def read_modelfile_system(folder: Path) -> str | None:
    """The SYSTEM prompt of an Ollama Modelfile in ``folder`` (a ship/ bundle), if any."""
    path = Path(folder) / "Modelfile"
    if not path.is_file():
        return None
    found = re.search(r'^SYSTEM """(.*?)"""', path.read_text(errors="replace"), flags=re.S | re.M)
    return found.group(1) if found else None
