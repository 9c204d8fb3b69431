"""``ftedge chat``: streaming greedy chat with any artifact, interactive or one-shot (``--prompt``).

The artifact may be a .gguf, an ORT GenAI folder, an HF folder, or a run folder (``ftedge.session.resolve``;
for a run ``ftedge.choose.default_model`` picks the shipped model, else the best passing GGUF, else the merged model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from ftedge.backends import load_backend
from ftedge.backends.base import Backend, detect_format
from ftedge.errors import FtedgeError
from ftedge.formats.gguf import inspect_gguf
from ftedge.launch import MAX_CTX, serve_context
from ftedge.session import resolve

log = logging.getLogger(__name__)

COMMANDS = "/reset clears the conversation, /exit (or Ctrl-D) quits"


def stream_reply(backend: Backend, messages: list[dict[str, str]], *, max_new_tokens: int, write: Callable[[str], None]) -> str:
    """Generate one assistant turn, writing each text piece as it arrives; returns the full text."""
    with backend.stream(backend.chat_ids(messages), max_new_tokens=max_new_tokens) as reply:
        for piece in reply.pieces():
            if piece:
                write(piece)
    return reply.text()


def fit_history(backend: Backend, messages: list[dict[str, str]], *, n_ctx: int, max_new_tokens: int) -> list[dict[str, str]]:
    """Drop the oldest user/assistant turns until the prompt fits the context less the reply (the system turn stays)."""
    budget = n_ctx - max_new_tokens
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head) :]
    while len(turns) > 1 and len(backend.chat_ids(head + turns)) > budget:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    n = len(backend.chat_ids(head + turns))
    if n > budget:
        shorter = "send a shorter message" + (" or lower --max-new-tokens" if n < n_ctx else "")
        raise FtedgeError(
            f"the message is longer than the context: its prompt is {n} tokens, and this model's context of {n_ctx} tokens "
            f"keeps {max_new_tokens} for the reply (--max-new-tokens {max_new_tokens}), leaving {max(budget, 0)}",
            hint=shorter,
        )
    return head + turns


def interactive(backend: Backend, system: str | None, *, max_new_tokens: int, n_ctx: int, lines: Iterable[str] | None = None) -> None:
    """Read a message per line, stream the reply; keeps the conversation until /reset."""

    def base() -> list[dict[str, str]]:
        return [{"role": "system", "content": system}] if system else []

    messages = base()
    source = iter(lines) if lines is not None else None
    while True:
        try:
            text = (
                next(source)
                if source is not None
                else click.prompt(click.style("you", fg="cyan"), prompt_suffix="> ", default="", show_default=False)
            )
        except (EOFError, StopIteration, click.exceptions.Abort):
            click.echo()
            return
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = base()
            click.secho("(conversation cleared)", dim=True, err=True)
            continue
        try:
            messages = fit_history(backend, [*messages, {"role": "user", "content": text}], n_ctx=n_ctx, max_new_tokens=max_new_tokens)
        except FtedgeError as err:  # the session goes on: the user can send something shorter
            click.secho(f"error: {err.one_line()}", fg="red", err=True)
            continue
        click.secho("bot> ", fg="green", nl=False)
        reply = stream_reply(backend, messages, max_new_tokens=max_new_tokens, write=lambda s: click.echo(s, nl=False))
        click.echo()
        messages.append({"role": "assistant", "content": reply})


def chat_session(artifact: Path, *, prompt: str | None, system: str | None, max_new_tokens: int, threads: int | None) -> None:
    """Chat with an artifact: one reply to ``prompt`` on stdout, or an interactive session."""
    if max_new_tokens <= 0:
        raise FtedgeError(f"--max-new-tokens must be positive (got {max_new_tokens})")
    if prompt is not None and not prompt.strip():
        raise FtedgeError("--prompt is empty", hint="give the message to answer, or leave --prompt out to chat interactively")
    path, run_system = resolve(Path(artifact))
    system = run_system if system is None else (system or None)
    n_ctx = MAX_CTX
    if detect_format(path) == "gguf":  # the context serve opens too: the model's trained one, at most MAX_CTX
        n_ctx = serve_context(inspect_gguf(path))
    backend = load_backend(path, threads=threads, n_ctx=n_ctx)
    n_ctx = min(n_ctx, backend.context_length)
    with backend:
        if prompt is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            messages = fit_history(backend, messages, n_ctx=n_ctx, max_new_tokens=max_new_tokens)
            stream_reply(backend, messages, max_new_tokens=max_new_tokens, write=lambda s: click.echo(s, nl=False))
            click.echo()
            return
        click.secho(f"chatting with {path} (context {n_ctx} tokens; {COMMANDS})", dim=True, err=True)
        interactive(backend, system, max_new_tokens=max_new_tokens, n_ctx=n_ctx)
