"""The export stage (``ftedge export``): ``stage`` (every artifact of a target, gated and recorded),
``gate`` (parity against the merged model), ``gguf``, ``onnx`` + ``gptq`` (builders), ``modelfile`` (Ollama)."""

from ftedge.export.stage import export_stage

__all__ = ["export_stage"]
