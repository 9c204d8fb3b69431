"""ftedge serve: the official openai client, 16 concurrent streams, the bad-request corpus, client
disconnects, the API key, the CLI (Ctrl-C), the ship/ launch lines, and the chat page in headless Chromium.

One tiny random GGUF (conftest's ``varied_gguf``: varied greedy replies) is served from a uvicorn
thread; every expected answer is the in-process greedy reply of the same file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from helpers import start_serve_cli

from ftedge.backends.base import Sampling, sample_next

SYSTEM = "Reply with the intent label."
N_CTX = 2048  # above the tiny model's trained 512, so a disconnected stream would have a long way to go


@pytest.fixture(scope="module")
def reference(varied_gguf: Path) -> Iterator:
    """The same GGUF in-process: the greedy answers every served answer must equal."""
    from ftedge.backends import load_backend

    with load_backend(varied_gguf, threads=1, n_ctx=N_CTX) as backend:
        yield backend


class Served:
    def __init__(self, engine, server, thread, url: str) -> None:
        self.engine, self.server, self.thread, self.url = engine, server, thread, url

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, timeout=60, **kwargs)


@contextlib.contextmanager
def serve_in_thread(gguf: Path, **kwargs) -> Iterator[Served]:
    import uvicorn

    from ftedge.serve import bind, create_app, load_engine

    api_key = kwargs.pop("api_key", None)
    engine = load_engine(gguf, threads=1, n_ctx=N_CTX, system=SYSTEM, **kwargs)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, api_key=api_key), log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Served(engine, server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.close()
        sock.close()


@pytest.fixture(scope="module")
def served(varied_gguf: Path) -> Iterator[Served]:
    with serve_in_thread(varied_gguf) as s:
        yield s


def greedy(backend, messages: list[dict[str, str]], n: int) -> str:
    return backend.reply(messages, max_new_tokens=n)


# -- the sampling helper ------------------------------------------------------------------
def test_sample_next_greedy_top_p_and_distribution() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    assert sample_next(logits, None, None) == int(np.argmax(logits)) == sample_next(logits, Sampling(), None)
    assert {sample_next(logits, Sampling(temperature=1.0, top_p=1e-6), rng) for _ in range(50)} == {int(np.argmax(logits))}
    # a draw follows softmax(logits / T): compare frequencies on 3 tokens
    small = np.log(np.array([0.6, 0.3, 0.1]))
    draws = np.bincount([sample_next(small, Sampling(temperature=1.0), rng) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(draws, [0.6, 0.3, 0.1], atol=0.03)
    hot = np.bincount([sample_next(small, Sampling(temperature=2.0), rng) for _ in range(4000)], minlength=3) / 4000
    p = np.sqrt([0.6, 0.3, 0.1])
    assert np.allclose(hot, p / p.sum(), atol=0.03)
    nucleus = {sample_next(small, Sampling(temperature=1.0, top_p=0.8), rng) for _ in range(500)}
    assert nucleus == {0, 1}  # 0.6 < 0.8: the token that crosses top_p stays in, the 0.1 tail is cut
    seq = [sample_next(logits, Sampling(temperature=1.0, seed=7), Sampling(seed=7).rng()) for _ in range(3)]
    assert len(set(seq)) == 1  # the same seed, the same first draw


def test_greedy_generation_is_unchanged_by_the_sampling_argument(reference, varied_model_dir: Path) -> None:
    from ftedge.backends.torch import TorchBackend

    ids = reference.chat_ids([{"role": "user", "content": "hello"}])
    plain = list(reference.generate(ids, max_new_tokens=16))
    assert (
        list(reference.generate(ids, max_new_tokens=16, sampling=None))
        == plain
        == list(reference.generate(ids, max_new_tokens=16, sampling=Sampling()))
    )
    a = list(reference.generate(ids, max_new_tokens=16, sampling=Sampling(temperature=1.0, seed=3)))
    b = list(reference.generate(ids, max_new_tokens=16, sampling=Sampling(temperature=1.0, seed=3)))
    c = list(reference.generate(ids, max_new_tokens=16, sampling=Sampling(temperature=1.0, seed=4)))
    assert a == b and a != c and a != plain
    torch_backend = TorchBackend(varied_model_dir, threads=1)
    t_ids = torch_backend.chat_ids([{"role": "user", "content": "hello"}])
    t_plain = list(torch_backend.generate(t_ids, max_new_tokens=8))
    assert list(torch_backend.generate(t_ids, max_new_tokens=8, sampling=Sampling())) == t_plain
    t_a = list(torch_backend.generate(t_ids, max_new_tokens=8, sampling=Sampling(temperature=1.0, seed=3)))
    assert t_a == list(torch_backend.generate(t_ids, max_new_tokens=8, sampling=Sampling(temperature=1.0, seed=3))) and t_a != t_plain


def test_stop_matcher_holds_back_partial_stops() -> None:
    from ftedge.serve import StopMatcher

    m = StopMatcher(["END", "xyz"])
    out = [m.push(p) for p in ["ab", "cE", "N", "D tail"]]
    assert out == [("ab", False), ("c", False), ("", False), ("", True)]
    m = StopMatcher(["END"])
    assert m.push("aE") == ("a", False) and m.push("x") == ("Ex", False) and m.flush() == ""
    assert StopMatcher([]).push("END") == ("END", False)


# -- the openai client ----------------------------------------------------------------------
def test_openai_client_chat_streaming_and_not(served: Served, reference) -> None:
    client = served.client()
    (model,) = client.models.list().data
    assert model.id == "tiny.f16"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    expected = greedy(reference, messages, 12)
    assert len(set(expected)) > 5  # varied text, not one repeated token
    out = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(reference.chat_ids(messages))

    chunks = list(
        client.chat.completions.create(
            model=model.id, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected and len(pieces) > 3  # streamed piece by piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    # a stop string cuts the reply (streaming or not) and finishes with "stop"
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    cut = expected[: expected.index(stop)]
    out = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, stop=[stop])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut
    # a stop string that only starts like the reply's end: the held-back tail is still delivered
    almost = expected[-2:] + "\u2603never"
    streamed = client.chat.completions.create(model=model.id, messages=messages, max_tokens=12, stop=[almost], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_default_system_prompt_sampling_and_completions(served: Served, reference) -> None:
    client = served.client()
    user = [{"role": "user", "content": "where is my card"}]
    expected = greedy(reference, [{"role": "system", "content": SYSTEM}, *user], 10)
    out = client.chat.completions.create(model="tiny.f16", messages=user, max_tokens=10)
    assert out.choices[0].message.content == expected  # the recipe's system prompt is added when a request has none
    assert greedy(reference, user, 10) != expected
    assert out.usage.prompt_tokens == len(reference.chat_ids([{"role": "system", "content": SYSTEM}, *user]))

    sampled = [
        client.chat.completions.create(model="tiny.f16", messages=user, max_tokens=10, temperature=1.0, top_p=0.95, seed=s)
        .choices[0]
        .message.content
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0] != expected
    negative_seed = client.chat.completions.create(model="tiny.f16", messages=user, max_tokens=4, temperature=1.0, seed=-5)
    assert negative_seed.usage.completion_tokens == 4

    prompt = "The weather today is"
    ids = list(reference.generate(reference.tokenize(prompt), max_new_tokens=8, stop_ids=reference.stop_ids))
    text = reference.detokenize([t for t in ids if t not in reference.stop_ids])
    done = client.completions.create(model="tiny.f16", prompt=prompt, max_tokens=8)
    assert done.choices[0].text == text and done.usage.completion_tokens == len(ids)
    streamed = client.completions.create(model="tiny.f16", prompt=prompt, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    health = httpx.get(served.url + "/health").json()
    assert health == {"status": "ok", "model": "tiny.f16"}


def test_sixteen_concurrent_streams_get_their_own_complete_answers(served: Served, reference) -> None:
    prompts = [f"question {i}: where is my money" for i in range(4)]
    system = [{"role": "system", "content": SYSTEM}]
    expected = {p: greedy(reference, [*system, {"role": "user", "content": p}], 24) for p in prompts}
    assert len(set(expected.values())) > 1
    client = served.client()

    def ask(i: int) -> tuple[str, str, int]:
        p = prompts[i % len(prompts)]
        stream = client.chat.completions.create(model="tiny.f16", messages=[{"role": "user", "content": p}], max_tokens=24, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        return p, "".join(pieces), len(pieces)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert len(results) == 16
    for p, text, n_pieces in results:
        assert text == expected[p] and n_pieces > 1


# -- bad requests -------------------------------------------------------------------------------
def _too_long() -> str:
    return "hello " * (N_CTX + 100)


BAD_REQUESTS = [
    # (name, method, path, body (dict -> JSON, str -> raw), status, error code)
    ("malformed JSON", "POST", "/v1/chat/completions", '{"model": "tiny.f16", "messages": [', 400, "invalid_json"),
    ("empty body", "POST", "/v1/chat/completions", "", 400, "invalid_json"),
    ("body is a list", "POST", "/v1/chat/completions", "[1, 2]", 400, "invalid_type"),
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
    ),
    ("empty messages", "POST", "/v1/chat/completions", {"model": "tiny.f16", "messages": []}, 400, "invalid_value"),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "tiny.f16"}, 400, "missing_required_parameter"),
    ("messages not a list", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, "invalid_value"),
    ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("content is a number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, 400, "invalid_value"),
    (
        "image content part",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "invalid_value",
    ),
    ("message not an object", "POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "invalid_value"),
    (
        "negative max_tokens",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        400,
        "invalid_value",
    ),
    (
        "zero max_tokens",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        "invalid_value",
    ),
    (
        "max_tokens as text",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
        400,
        "invalid_value",
    ),
    (
        "fractional max_tokens",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5},
        400,
        "invalid_value",
    ),
    (
        "negative temperature",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
        "invalid_value",
    ),
    (
        "temperature as text",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        "invalid_value",
    ),
    ("top_p zero", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "invalid_value"),
    (
        "stream as text",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        400,
        "invalid_value",
    ),
    (
        "stop is a number",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stop": 7},
        400,
        "invalid_value",
    ),
    (
        "too many stops",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stop": [str(i) for i in range(20)]},
        400,
        "invalid_value",
    ),
    ("n = 2", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "invalid_value"),
    ("seed as text", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400, "invalid_value"),
    (
        "tools",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        "unsupported_parameter",
    ),
    ("ends with assistant", "POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
    (
        "prompt longer than the context",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": _too_long()}]},
        400,
        "context_length_exceeded",
    ),
    (
        "prompt + max_tokens over the context",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": N_CTX},
        400,
        "context_length_exceeded",
    ),
    ("completion without prompt", "POST", "/v1/completions", {"model": "tiny.f16"}, 400, "missing_required_parameter"),
    ("completion with empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400, "invalid_value"),
    ("completion token ids out of range", "POST", "/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "invalid_value"),
    ("completion with two prompts", "POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_value"),
    ("completion with logprobs", "POST", "/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "unsupported_parameter"),
    ("completion too long", "POST", "/v1/completions", {"prompt": _too_long(), "stream": True}, 400, "context_length_exceeded"),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, 404, "model_not_found"),
    ("unknown route", "GET", "/v1/nothing", None, 404, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
]


def test_bad_requests_get_openai_style_4xx_json_and_the_server_lives(served: Served, reference) -> None:
    failures = []
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for name, method, path, body, status, code in BAD_REQUESTS:
            content = json.dumps(body) if isinstance(body, dict) else body
            resp = http.request(method, path, content=content, headers={"Content-Type": "application/json"} if body is not None else {})
            try:
                error = resp.json()["error"]
                ok = (
                    resp.status_code == status
                    and set(error) == {"message", "type", "param", "code"}
                    and error["code"] == code
                    and error["message"]
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
            assert http.get("/health").status_code == 200, f"server down after {name!r}"
        assert not failures, "\n".join(failures)
        err = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).json()["error"]
        assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
        err = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 42}]}).json()["error"]
        assert err["param"] == "messages.0.content" and "string" in err["message"] and "array" in err["message"]
    # the openai client sees them as its own exception types
    import openai

    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny.f16", messages=[{"role": "user", "content": _too_long()}], stream=True)
    out = client.chat.completions.create(model="tiny.f16", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert out.choices[0].message.content == greedy(
        reference, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}], 5
    )


def test_a_client_that_leaves_mid_stream_frees_the_model(served: Served, reference, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ftedge.serve")
    budget = N_CTX - 64
    body = {"model": "tiny.f16", "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": budget, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False)]
        assert any(line.startswith("data: ") for line in got)
    # the stream is closed: the generation must stop long before its budget, and the next request be served
    deadline = time.time() + 20
    while not any("client left" in r.getMessage() for r in caplog.records):
        assert time.time() < deadline, "the abandoned generation did not stop"
        time.sleep(0.05)
    stopped = next(r for r in caplog.records if "client left" in r.getMessage())
    assert int(re.search(r"after (\d+) tokens", stopped.getMessage()).group(1)) < budget // 2
    client = served.client()
    out = client.chat.completions.create(model="tiny.f16", messages=[{"role": "user", "content": "hi"}], max_tokens=6, timeout=10)
    assert out.choices[0].message.content == greedy(
        reference, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}], 6
    )


def test_api_key_is_checked_on_every_api_request(varied_gguf: Path) -> None:
    import openai

    with serve_in_thread(varied_gguf, api_key="sekret") as s:
        for path in ("/v1/models", "/v1/models/tiny.f16"):
            resp = httpx.get(s.url + path)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        resp = httpx.post(
            s.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer wrong"},
        )
        assert resp.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="tiny.f16", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        out = s.client(api_key="sekret").chat.completions.create(
            model="tiny.f16", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert out.usage.completion_tokens == 2
        assert (
            httpx.get(s.url + "/").status_code == 200 and httpx.get(s.url + "/health").status_code == 200
        )  # the page asks for the key itself


def test_serves_an_ort_genai_folder(varied_model_dir: Path, tmp_path: Path) -> None:
    """ONNX artifacts (no server of their own): served answers equal the in-process ORT GenAI ones; sampling works there too."""
    pytest.importorskip("onnxruntime_genai")
    from ftedge.backends import load_backend
    from ftedge.export.onnx import export_onnx

    onnx_dir = export_onnx(varied_model_dir, tmp_path / "onnx-fp32", "fp32")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    with load_backend(onnx_dir, threads=1) as ort:
        expected = greedy(ort, messages, 10)
        ids = ort.chat_ids(messages)
        plain = list(ort.generate(ids, max_new_tokens=10))
        assert list(ort.generate(ids, max_new_tokens=10, sampling=Sampling())) == plain
        assert list(ort.generate(ids, max_new_tokens=10, sampling=Sampling(temperature=1e-4, seed=0))) == plain  # sampled path, same logits
        seeded = list(ort.generate(ids, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=5)))
        assert seeded == list(ort.generate(ids, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=5))) != plain
    with serve_in_thread(onnx_dir) as s:
        card = httpx.get(s.url + "/v1/models").json()["data"][0]
        assert card["id"] == "onnx-fp32" and card["meta"]["format"] == "onnx" and card["meta"]["n_ctx"] == 512
        client = s.client()
        out = client.chat.completions.create(model="onnx-fp32", messages=messages[1:], max_tokens=10)
        assert out.choices[0].message.content == expected
        streamed = client.chat.completions.create(model="onnx-fp32", messages=messages, max_tokens=10, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


# -- the command --------------------------------------------------------------------------------


def test_cli_serves_a_ship_folder_and_stops_cleanly_on_ctrl_c(tmp_path: Path, varied_gguf: Path, reference) -> None:
    ship = tmp_path / "ship"
    ship.mkdir()
    shutil.copy(varied_gguf, ship / "tiny.q8_0.gguf")
    (ship / "Modelfile").write_text(f'FROM ./tiny.q8_0.gguf\nSYSTEM """{SYSTEM}"""\nPARAMETER temperature 0\n')
    proc, url = start_serve_cli([str(ship), "--port", "0", "--threads", "1", "--ctx", str(N_CTX)], timeout=60)
    try:
        cards = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert [c["id"] for c in cards] == ["tiny.q8_0"] and cards[0]["meta"]["system_prompt"] == SYSTEM  # from the bundle's Modelfile
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        out = client.chat.completions.create(model="tiny.q8_0", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
        assert out.choices[0].message.content == greedy(
            reference, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}], 6
        )
        # Ctrl-C in the middle of a long stream: the stream ends, the process exits 0 without a traceback
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": N_CTX - 64, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            next(lines)
            t0 = time.time()
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert time.time() - t0 < 10
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][len("data: ") :])["error"]["code"] == "shutting_down"
        rc = proc.wait(timeout=20)
        out_text, err_text = proc.stdout.read(), proc.stderr.read()
        assert rc == 0, err_text
        assert "server stopped" in out_text and "Traceback" not in err_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_warns_on_public_host_and_reports_a_taken_port(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ftedge.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path / "nope.gguf"), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "warning: listening on 0.0.0.0" in result.output and "not found" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(tmp_path / "nope.gguf"), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "warning" not in result.output


# -- ship/ launch lines ---------------------------------------------------------------------------
def test_ship_launch_lines_match_the_gguf_metadata(varied_gguf: Path, tmp_path: Path) -> None:
    from ftedge.formats.gguf import inspect_gguf
    from ftedge.launch import launch_section

    info = inspect_gguf(varied_gguf)
    assert info.context_length == 512 and info.chat_template
    text = launch_section(varied_gguf, "tiny", SYSTEM)
    file = varied_gguf.name
    assert f"ftedge serve {file} --port 8000" in text
    assert f"llama-server -m {file} --jinja -c 512 " in text
    assert "OLLAMA_CONTEXT_LENGTH=512 ollama serve" in text and "ollama create tiny -f Modelfile" in text
    assert f"lms import {file}" in text and "--context-length 512" in text
    assert info.stop_texts == ["<|im_end|>"] and "`<|im_end|>`" in text
    body = json.loads(re.search(r"-d '(.*)'", text).group(1))
    assert body["model"] == "tiny.f16"  # the name ftedge serve answers to
    assert repr(SYSTEM) in text


def test_ship_bundle_readme_and_serving_a_run_or_its_ship_folder(tmp_path: Path, tiny_recipe: Path, varied_gguf: Path) -> None:
    """ftedge's ship stage writes the launch lines; ftedge serve RUN / RUN/ship picks the shipped GGUF and the recipe's prompt."""
    from helpers import tiny_target

    from ftedge.launch import model_id
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.session import SystemPrompt, resolve
    from ftedge.ship import ship_stage

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    (run.path / "gguf").mkdir()
    shutil.copy(varied_gguf, run.path / "gguf" / "tiny.q8_0.gguf")
    run.record_artifact(
        "gguf-q8_0", run.path / "gguf" / "tiny.q8_0.gguf", stage="export", format="gguf", quant="q8_0", gate={"passed": True}
    )
    ship = ship_stage(run, tiny_target(tmp_path, ["q8_0"]))
    readme = (ship / "README.md").read_text()
    assert "ftedge serve tiny.q8_0.gguf --port 8000" in readme and "llama-server -m tiny.q8_0.gguf --jinja -c 512" in readme
    assert f'"model": "{model_id(ship / "tiny.q8_0.gguf")}"' in readme and "ollama create tiny -f Modelfile" in readme
    assert str(run.path) not in readme  # the bundle still stands alone
    for target in (run.path, ship):
        assert resolve(target) == (ship / "tiny.q8_0.gguf", SystemPrompt(SYSTEM, "run recipe"))
    several = tmp_path / "two"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(varied_gguf, several / name)
    from ftedge.errors import FtedgeError

    with pytest.raises(FtedgeError, match="several GGUF files"):
        resolve(several)


# -- the chat page in a real browser --------------------------------------------------------------
def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def test_chat_page_is_self_contained() -> None:
    from importlib import resources

    html = resources.files("ftedge").joinpath("static/chat.html").read_text()
    assert not re.search(r"https?://|//cdn|@import|url\(", html)  # nothing fetched from elsewhere: works offline
    assert "<script src" not in html and "<link" not in html


@pytest.mark.skipif(
    _browser() is None,
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_chat_page_streams_a_reply_in_headless_chromium(served: Served, reference) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver_path = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(served.url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert browser.find_element(By.ID, "system").get_attribute("value") == SYSTEM  # prefilled from the recipe
        assert "tiny.f16" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "max-tokens").send_keys("24")
        # record every text the reply shows while it streams
        browser.execute_script("""
            window.__seen = [];
            new MutationObserver(() => {
              const m = document.querySelector('.msg.assistant');
              if (m) window.__seen.push(m.textContent);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        """)
        box = browser.find_element(By.ID, "input")
        box.send_keys("where is my card")
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-replies") == "1")
        expected = greedy(reference, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "where is my card"}], 24)
        replies = [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
        assert [r.strip() for r in replies] == [expected.strip()]
        seen = [s for s in browser.execute_script("return window.__seen") if s]
        assert len(set(seen)) > 3 and all(expected.startswith(s) for s in seen)  # the reply grew token by token
        assert re.search(r"24 tokens · [\d.]+ tok/s", browser.find_element(By.ID, "stats").text)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
    finally:
        browser.quit()
