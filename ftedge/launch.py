"""How a shipped GGUF is launched: its served name, context size, and the command lines for
``ftedge serve``, llama.cpp's ``llama-server``, Ollama and LM Studio, all read from the GGUF's metadata.

Kept free of heavy imports: ship/ writes these lines, ``ftedge serve`` uses the same name and context.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ftedge.formats.gguf import GgufInfo, inspect_gguf

MAX_CTX = 4096  # the context ftedge chat/serve open by default (also the launch lines'): enough for chat, small KV cache
DEFAULT_PORT = 8000


def serve_context(info: GgufInfo) -> int:
    """The context to serve a GGUF with: its trained context, capped at MAX_CTX."""
    trained = info.context_length
    return min(trained, MAX_CTX) if trained else MAX_CTX


def model_id(path: str | Path) -> str:
    """The name a served artifact answers to: the file name without .gguf, or the folder name."""
    path = Path(path)
    return path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name


def launch_section(gguf_path: Path, model_name: str, system_prompt: str | None, *, port: int = DEFAULT_PORT) -> str:
    """README text: serve the GGUF over an OpenAI-compatible API with ftedge, llama-server, Ollama or LM Studio."""
    info = inspect_gguf(gguf_path)
    file = Path(gguf_path).name
    ctx = serve_context(info)
    name = model_id(file)
    stops = info.stop_texts
    stop_note = ", ".join(f"`{s}`" for s in stops) or "the model's end-of-turn token"
    template = "the chat template stored in the GGUF" if info.chat_template else "the runtime's default chat template (the GGUF has none)"
    sys_note = (
        "`ftedge serve` and the Modelfile add the tuned system prompt when a request has none; with llama-server and LM Studio, "
        f"send it yourself as the first message: {system_prompt!r}."
        if system_prompt
        else "The model was tuned without a system prompt."
    )
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hello"}]})
    return f"""
## Serve it (OpenAI-compatible API)

Every line below uses {template}, stops at {stop_note}, and opens a context of {ctx} tokens
(the GGUF's trained context{" capped at " + str(MAX_CTX) if (info.context_length or 0) > MAX_CTX else ""}). {sys_note}

ftedge (API, and a chat page at http://127.0.0.1:{port}/):

    ftedge serve {file} --port {port}
    curl http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}

llama.cpp's own server and web UI (`llama-server` from a llama.cpp build or release):

    llama-server -m {file} --jinja -c {ctx} --temp 0 --host 127.0.0.1 --port 8080

Ollama (API at http://127.0.0.1:11434/v1, model `{model_name}`):

    ollama create {model_name} -f Modelfile
    OLLAMA_CONTEXT_LENGTH={ctx} ollama serve

LM Studio (`lms`, API at http://127.0.0.1:1234/v1; load the key `lms ls` shows for the import):

    lms import {file} --copy --yes --user-repo ftedge/{model_name}
    lms load ftedge/{model_name} --context-length {ctx} --identifier {name}
    lms server start --port 1234
"""
