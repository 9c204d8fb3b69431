"""One greedy-generation loop per runtime: ``Backend.generate`` in ``ftedge/backends/``, consumed everywhere else
through ``Backend.stream``. Bench, chat and serve answer a prompt with exactly the tokens that loop yields, (that no
module outside ``backends/`` calls ``generate`` itself is checked in test_layout.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello", "what is my card balance", "Grüße aus Köln 🚀"]
SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def backend(varied_gguf: Path) -> Iterator:
    """conftest's varied_gguf (greedy replies are varied text) in-process."""
    from ftedge.backends import load_backend
    from ftedge.formats.gguf import inspect_gguf
    from ftedge.launch import serve_context

    with load_backend(varied_gguf, threads=1, n_ctx=serve_context(inspect_gguf(varied_gguf))) as b:  # the context chat opens
        yield b


def loop_tokens(backend, ids: list[int], n: int, stops: set[int] | None = None) -> list[int]:
    """What the runtime's own loop yields (the stop token included): the reference for every consumer."""
    return list(backend.generate(ids, max_new_tokens=n, stop_ids=backend.stop_ids if stops is None else stops))


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def test_stream_yields_the_runtime_loop_tokens(backend) -> None:
    finishes = set()
    for prompt in PROMPTS:
        ids = backend.chat_ids(messages(prompt))
        free = loop_tokens(backend, ids, 40, set())
        # the artifact's stops (the random model never says them), and a token it does say as a stop
        for stops, n in ((None, 1), (None, 40), ({free[5]}, 40), ({free[5]}, 3)):
            raw = loop_tokens(backend, ids, n, stops)
            reply = backend.stream(ids, max_new_tokens=n, stop_ids=stops)
            pieces = list(reply.pieces())
            kept = [t for t in raw if t not in reply.stops]
            assert reply.ids == raw and reply.tokens == kept and len(pieces) == len(kept)
            assert "".join(pieces) + reply.rest() == reply.text() == backend.detokenize(kept)
            assert reply.finish == ("stop" if raw and raw[-1] in reply.stops else "length")
            finishes.add(reply.finish)
    assert finishes == {"stop", "length"}  # both endings were exercised


def test_closing_a_stream_stops_the_runtime_loop(backend) -> None:
    """Breaking off (serve: the client left) closes the runtime's generator: nothing more is generated."""
    seen: list[int] = []
    original = backend.generate

    def counting(*args, **kwargs):
        for token in original(*args, **kwargs):
            seen.append(token)
            yield token

    backend.generate = counting
    try:
        with backend.stream(backend.chat_ids(messages("hello")), max_new_tokens=50, stop_ids=set()) as reply:
            for i, _ in enumerate(reply):
                if i == 2:
                    break
        assert len(seen) == 3 and reply.text() == backend.detokenize(seen)  # closed: text() generates nothing more
    finally:
        del backend.generate


def test_bench_chat_and_serve_answer_with_the_backend_loop(backend, varied_gguf: Path) -> None:
    from ftedge.backends.base import Sampling
    from ftedge.bench import generative, measures
    from ftedge.cli import main
    from ftedge.serve import Engine, Job

    stops = backend.stop_ids
    engine = Engine(backend, name="tiny", n_ctx=backend.context_length)
    engine.close = lambda: None  # the module's backend outlives this engine

    async def serve_answer(msgs: list[dict[str, str]], n: int) -> tuple[str, tuple]:
        job = Job(asyncio.get_running_loop(), prompt=lambda b: b.chat_ids(msgs), max_tokens=n, sampling=Sampling(), stops=[])
        engine.submit(job)
        parts: list[str] = []
        while True:
            event = await job.events.get()
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise event[1]
            elif event[0] == "done":
                return "".join(parts), event

    texts = set()
    for prompt in PROMPTS:
        msgs = messages(prompt)
        ids = backend.chat_ids(msgs)
        raw = loop_tokens(backend, ids, 12)
        expected = backend.detokenize([t for t in raw if t not in stops])
        texts.add(expected)
        # bench: label_match answers and generative answers
        assert measures.decode_answer(backend, ids, 12) == (expected, len(raw))
        budget = generative.budget(backend, ["x"])
        long_raw = loop_tokens(backend, ids, budget)
        gen = generative.answers(backend, [{"messages": msgs, "target": "x"}], n_ctx=backend.context_length)
        assert gen[0]["answer"] == backend.detokenize([t for t in long_raw if t not in stops]).strip()
        # chat (the CLI, its own process-level load of the same file)
        res = CliRunner().invoke(
            main, ["chat", str(varied_gguf), "--prompt", prompt, "--system", SYSTEM, "--max-new-tokens", "12", "--threads", "1"]
        )
        assert res.exit_code == 0, res.output
        assert res.output == expected + "\n"
        # serve (the engine every HTTP request runs on)
        text, (_, finish, n_prompt, n_new, _) = asyncio.run(serve_answer(msgs, 12))
        assert text == expected and n_prompt == len(ids) and n_new == len([t for t in raw if t not in stops])
        assert finish == ("stop" if raw[-1] in stops else "length")
    assert len(texts) == len(PROMPTS) and all(texts)  # varied, non-empty answers: a mix-up would show
