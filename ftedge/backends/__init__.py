"""Runtimes behind one interface. Each module here is the only code that knows its runtime's API.

Optional runtimes are imported lazily: ``load_backend`` picks one from the artifact's kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftedge.backends.base import Backend, detect_format
from ftedge.errors import FtedgeError

__all__ = ["Backend", "detect_format", "load_backend", "runtime_options"]


def load_backend(
    path: str | Path, *, threads: int | None = None, n_ctx: int = 2048, adapter: str | Path | None = None, **kwargs
) -> Backend:
    """Open any artifact: a .gguf file, an ONNX (ORT GenAI) folder, or an HF folder (+ optional adapter)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from ftedge.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, threads=threads, n_ctx=n_ctx, **kwargs)
    if fmt == "onnx":
        from ftedge.backends.ortgenai import OrtGenAIBackend

        return OrtGenAIBackend(path, threads=threads, **kwargs)
    if fmt == "hf":
        from ftedge.backends.torch import TorchBackend

        return TorchBackend(path, adapter=adapter, threads=threads, **kwargs)
    raise FtedgeError(f"{path}: not a .gguf file, an ORT GenAI folder (genai_config.json) or an HF folder (config.json)")


def runtime_options(path: str | Path, runtime: Any | None) -> dict[str, Any]:
    """``load_backend`` keywords for a target profile's ``runtime`` section (a RuntimeSpec or its dict): llama.cpp's only."""
    if runtime is None or detect_format(Path(path)) != "gguf":
        return {}
    spec = runtime if isinstance(runtime, dict) else runtime.model_dump()
    return {"flash_attn": spec["flash_attn"], "repack": spec["repack"]}
