"""``ftedge serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a chat page, on ftedge's own backends.

The model is the artifact that passed the export gate, loaded with the same backend (chat template,
stop tokens, AMX-safe loading) as ``ftedge chat`` and ``ftedge bench``.

Concurrency: one model, one worker thread. Each request becomes a job on a single-thread executor
(FIFO) that holds the model lock while it tokenizes and generates; tokens travel to the request's
event loop through an asyncio queue. Between tokens the job checks a cancel flag that is set when the
client disconnects (or the server stops), so an abandoned stream frees the model at once.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /health``, and the chat page at ``/``. Errors are OpenAI's JSON shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for every bad request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftedge import __version__
from ftedge.backends import load_backend
from ftedge.backends.base import Backend, Sampling, detect_format
from ftedge.errors import FtedgeError
from ftedge.formats.modelfile import read_modelfile_system
from ftedge.launch import MAX_CTX, model_id, serve_context
from ftedge.session import resolve

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_STOPS = 16


# -- errors -------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: Sequence[Any]) -> str | None:
    """'messages.0.content' from pydantic's location, without the tags it adds for union members ('str', 'list[TextPart]')."""
    keep = [str(p) for p in loc if isinstance(p, int) or (p not in _TYPE_TAGS and str(p).replace("_", "").isalpha() and str(p).islower())]
    return ".".join(keep) or None


def _validation_error(err: ValidationError) -> ApiError:
    errors = err.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON ({first['msg']}).", code="invalid_json")
    param = _param(first["loc"])
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first["type"] == "model_type" and not first["loc"]:
        return ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param))  # every member of a union that failed
    return ApiError(400, f"Invalid value for '{param}': {'; or '.join(reasons)}.", param=param, code="invalid_value")


def shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down")


# -- request bodies (validated strictly: no "5" for 5, no 1.5 for an integer) -------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"At most {MAX_STOPS} stop sequences are supported (got {len(stops)}).", param="stop", code="invalid_value")
        return [s for s in stops if s]

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed)


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as err:
        raise _validation_error(err) from None


# -- stop strings -------------------------------------------------------------------------
class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# -- the model and its worker ------------------------------------------------------------------
@dataclass
class Job:
    """One generation: what to run, and how it reports back to the request's event loop."""

    loop: asyncio.AbstractEventLoop
    prompt: Callable[[Backend], list[int]]  # token ids of the prompt, computed on the worker
    max_tokens: int | None
    sampling: Sampling
    stops: list[str]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """One loaded model behind a lock, and the single worker thread that runs jobs on it in order."""

    def __init__(self, backend: Backend, *, name: str, n_ctx: int, system_prompt: str | None = None, path: Path | None = None) -> None:
        self.backend = backend
        self.name = name
        self.n_ctx = n_ctx
        self.system_prompt = system_prompt
        self.path = Path(path) if path is not None else Path(backend.path)
        self.format = detect_format(self.path)
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.stop_ids = backend.stop_ids
        self.n_vocab = backend.vocab_size
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftedge-model")

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise shutting_down()
        self._executor.submit(self._run, job)

    def close(self) -> None:
        """Stop: the running job ends at its next token, queued ones are answered 503, then the model is freed."""
        self.stopping.set()
        self._executor.shutdown(wait=True)
        with self.lock:
            self.backend.close()

    def _run(self, job: Job) -> None:
        with self.lock:
            if job.cancel.is_set():
                return
            if self.stopping.is_set():
                job.emit("error", shutting_down())
                return
            try:
                self._generate(job)
            except ApiError as err:
                job.emit("error", err)
            except FtedgeError as err:
                job.emit("error", ApiError(400, err.one_line()))
            except Exception as err:  # a bug: the request fails, the server lives on
                log.exception("generation failed")
                job.emit("error", ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error"))

    def _generate(self, job: Job) -> None:
        backend = self.backend
        ids = job.prompt(backend)
        n_prompt = len(ids)
        if n_prompt == 0:
            raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        room = self.n_ctx - n_prompt
        if room < 1 or (job.max_tokens is not None and job.max_tokens > room):
            wanted = (
                f" However, you requested {n_prompt + job.max_tokens} tokens ({n_prompt} in the prompt, {job.max_tokens} "
                "for the completion)."
                if job.max_tokens
                else f" However, the prompt has {n_prompt} tokens, leaving no room for a reply."
            )
            raise ApiError(
                400,
                f"This model's maximum context length is {self.n_ctx} tokens.{wanted} Shorten the messages or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        budget = room if job.max_tokens is None else job.max_tokens
        job.emit("ready", n_prompt)
        matcher = StopMatcher(job.stops)
        finish, cut = "length", False
        t0 = time.perf_counter()
        t_first = t0
        with backend.stream(ids, max_new_tokens=budget, stop_ids=self.stop_ids, sampling=job.sampling) as reply:
            for piece in reply.pieces():
                if job.cancel.is_set():
                    log.info("client left: generation stopped after %d tokens", len(reply.tokens) - 1)
                    return
                if self.stopping.is_set():
                    job.emit("error", shutting_down())
                    return
                if len(reply.tokens) == 1:
                    t_first = time.perf_counter()
                text, hit = matcher.push(piece)
                if text:
                    job.emit("text", text)
                if hit:
                    finish, cut = "stop", True
                    break
        if not cut:  # what the decoder and the stop matcher still hold back belongs to the reply
            finish = reply.finish
            text, _ = matcher.push(reply.rest())
            tail = text + matcher.flush()
            if tail:
                job.emit("text", tail)
        job.emit("done", finish, n_prompt, len(reply.tokens), (t_first - t0, time.perf_counter() - t_first))


def load_engine(artifact: Path, *, threads: int | None = None, n_ctx: int | None = None, system: str | None = None) -> Engine:
    """Load what ``ftedge serve ARTIFACT|RUN|SHIP_DIR`` names; ``system`` overrides the recipe's prompt ("" for none)."""
    path, run_system = resolve_artifact(Path(artifact))
    fmt = detect_format(path)
    if fmt == "gguf":
        from ftedge.formats.gguf import inspect_gguf

        ctx = n_ctx or serve_context(inspect_gguf(path))
    else:
        ctx = n_ctx or MAX_CTX
    backend = load_backend(path, threads=threads, n_ctx=ctx) if fmt == "gguf" else load_backend(path, threads=threads)
    ctx = min(ctx, backend.context_length)
    system_prompt = run_system if system is None else (system or None)
    return Engine(backend, name=model_id(path), n_ctx=ctx, system_prompt=system_prompt, path=path)


def resolve_artifact(artifact: Path) -> tuple[Path, str | None]:
    """``ftedge chat``'s resolution (file, model folder, run), plus ship/ bundles: a folder whose model is a .gguf
    (the system prompt then comes from the run's recipe, else from the bundle's Modelfile)."""
    artifact = Path(artifact)
    if artifact.is_dir() and not (artifact / "genai_config.json").is_file() and not (artifact / "config.json").is_file():
        from ftedge.choose import bundle_model
        from ftedge.manifest import find_run

        run = find_run(artifact)
        if run is None or artifact.resolve() != run.path:
            model = bundle_model(artifact)
            if model is not None:
                path, system = resolve(model)
                return path, system if system is not None else read_modelfile_system(artifact)
    return resolve(artifact)


# -- responses ---------------------------------------------------------------------------------
def _head(cid: str, model: str, fingerprint: str) -> dict[str, Any]:
    """The fields every completion object and stream chunk starts with."""
    return {"id": cid, "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}


def _chunk(head: dict[str, Any], choice: dict[str, Any], *, usage: dict | None = None, timings: dict | None = None) -> dict[str, Any]:
    """One server-sent chunk: the choice, or (with ``usage``) the final usage-only chunk OpenAI sends."""
    if usage is not None:
        return {**head, "choices": [], "usage": usage}
    return {**head, "choices": [choice], **({"timings": timings} if timings is not None else {})}


def _usage(n_prompt: int, n_new: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def _timings(n_new: int, times: tuple[float, float]) -> dict[str, float]:
    """Server-side timings (as llama-server reports them): time to the first token, then decode speed after it."""
    first, rest = times
    rate = (n_new - 1) / rest if n_new > 1 and rest > 0 else 0.0
    return {
        "first_token_ms": round(first * 1000, 3),
        "predicted_n": n_new,
        "predicted_ms": round(rest * 1000, 3),
        "predicted_per_second": round(rate, 3),
    }


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    fingerprint = f"ftedge-{__version__}-{engine.backend.name}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stopping.set()  # running generations end at their next token

    app = FastAPI(title="ftedge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}" if err.status_code in (404, 405) else str(err.detail)
        return JSONResponse(ApiError(err.status_code, message, code=code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        first = (err.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")) or None
        return JSONResponse(
            ApiError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param, code="invalid_value").body(),
            status_code=400,
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", type="server_error").body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")

    auth = [Depends(check_key)]

    def model_card() -> dict[str, Any]:
        return {
            "id": engine.name,
            "object": "model",
            "created": engine.created,
            "owned_by": "ftedge",
            "meta": {
                "format": engine.format,
                "backend": engine.backend.name,
                "file": engine.path.name,
                "n_ctx": engine.n_ctx,
                "system_prompt": engine.system_prompt,
            },
        }

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.name:
            raise ApiError(
                404, f"The model '{name}' does not exist: this server serves '{engine.name}'.", param="model", code="model_not_found"
            )

    async def next_event(job: Job, request: Request) -> tuple[Any, ...]:
        """The job's next event; the job is cancelled if the client leaves meanwhile (queued or generating)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    raise ApiError(499, "client disconnected") from None

    async def run(job: Job, request: Request) -> tuple[Any, ...]:
        engine.submit(job)
        event = await next_event(job, request)
        if event[0] == "error":
            raise event[1]
        return event

    async def collect(job: Job, request: Request) -> tuple[str, tuple[Any, ...]]:
        parts: list[str] = []
        while True:
            event = await next_event(job, request)
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                return "".join(parts), event

    class EventStream(StreamingResponse):
        """SSE response that cancels its job however it ends (done, client gone, server stopping)."""

        def __init__(self, body: AsyncIterator[bytes], job: Job) -> None:
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel.set()

    async def stream_events(
        job: Job, chunk: Callable[..., dict[str, Any]], first: dict[str, Any] | None, usage: bool
    ) -> AsyncIterator[bytes]:
        if first is not None:
            yield _sse(first)
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield _sse(chunk(text=event[1]))
            elif event[0] == "error":
                yield _sse(event[1].body())
                break
            else:
                _, finish, n_prompt, n_new, dt = event
                yield _sse(chunk(finish=finish, timings=_timings(n_new, dt)))
                if usage:
                    yield _sse(chunk(usage=_usage(n_prompt, n_new)))
                break
        yield b"data: [DONE]\n\n"

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        html = resources.files("ftedge").joinpath("static/chat.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req: ChatRequest = parse_body(await request.body(), ChatRequest)
        check_model(req.model)
        if req.tools:
            raise ApiError(400, "Tools are not supported by this server.", param="tools", code="unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(400, "Only the 'text' response_format is supported.", param="response_format", code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if messages[-1]["role"] == "assistant":
            raise ApiError(
                400,
                "The last message must not be the assistant's (continuing a reply is not supported).",
                param="messages",
                code="invalid_value",
            )
        if engine.system_prompt and all(m["role"] != "system" for m in messages):
            messages.insert(0, {"role": "system", "content": engine.system_prompt})
        job = Job(
            asyncio.get_running_loop(),
            prompt=lambda b: b.chat_ids(messages),
            max_tokens=req.max_completion_tokens or req.max_tokens,
            sampling=req.sampling(),
            stops=req.stops(),
        )
        _, n_prompt = await run(job, request)
        head = _head(f"chatcmpl-{uuid.uuid4().hex}", engine.name, fingerprint)
        if req.stream:

            def chunk(*, text: str | None = None, finish: str | None = None, role: bool = False, **extra: Any) -> dict[str, Any]:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return _chunk({**head, "object": "chat.completion.chunk"}, choice, **extra)

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream_events(job, chunk, chunk(role=True), include_usage), job)
        try:
            text, (_, finish, n_prompt, n_new, dt) = await collect(job, request)
        finally:
            job.cancel.set()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        return JSONResponse(
            {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(n_prompt, n_new), "timings": _timings(n_new, dt)}
        )

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_body(await request.body(), CompletionRequest)
        check_model(req.model)
        if req.echo or req.logprobs is not None:
            raise ApiError(
                400,
                "echo and logprobs are not supported by this server.",
                param="echo" if req.echo else "logprobs",
                code="unsupported_parameter",
            )
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "Only one prompt per request is supported.", param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= engine.n_vocab for t in ids):
                raise ApiError(400, f"Token ids must be in [0, {engine.n_vocab}).", param="prompt", code="invalid_value")

            def make_prompt(b: Backend) -> list[int]:
                return ids
        else:
            text = prompt

            def make_prompt(b: Backend) -> list[int]:
                return b.tokenize(text)

        job = Job(
            asyncio.get_running_loop(),
            prompt=make_prompt,
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            sampling=req.sampling(),
            stops=req.stops(),
        )
        await run(job, request)
        head = {**_head(f"cmpl-{uuid.uuid4().hex}", engine.name, fingerprint), "object": "text_completion"}
        if req.stream:

            def chunk(*, text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
                return _chunk(head, {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}, **extra)

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream_events(job, chunk, None, include_usage), job)
        try:
            text, (_, finish, n_prompt, n_new, dt) = await collect(job, request)
        finally:
            job.cancel.set()
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(n_prompt, n_new), "timings": _timings(n_new, dt)})

    return app


# -- the command -----------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); one-line error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise FtedgeError(
            f"cannot listen on {host}:{port} ({err.strerror or err})", hint="pick another --port, or stop what uses it"
        ) from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn takes the socket over
    sock.set_inheritable(True)
    return sock


def serve(
    artifact: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    api_key: str | None = None,
    system: str | None = None,
    n_ctx: int | None = None,
    say: Callable[[str], None] = log.info,
    warn: Callable[[str], None] = log.warning,
) -> None:
    """Load the artifact, listen, and serve until Ctrl-C (then stop cleanly)."""
    import uvicorn

    if host not in LOOPBACK:
        warn(
            f"warning: listening on {host}: anyone who can reach this machine can use the model"
            + ("" if api_key else " (add --api-key to require a key)")
        )
    sock = bind(host, port)
    try:
        engine = load_engine(artifact, threads=threads, n_ctx=n_ctx, system=system)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, api_key=api_key)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stopping.set()  # streams end now (503 to the queue) instead of at the graceful-shutdown timeout
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False))
    say(f"serving {engine.name} ({engine.format}, {engine.backend.name}, context {engine.n_ctx}) on http://{shown}:{real_port}")
    say(f"  chat page: http://{shown}:{real_port}/   API: http://{shown}:{real_port}/v1   (Ctrl-C stops)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the captured Ctrl-C after its clean shutdown
        pass
    finally:
        engine.close()
        sock.close()
    say("server stopped")
