"""File formats and their vocabulary, independent of any runtime.

- ``quants``: every GGUF type and ONNX precision ftedge builds, and their default gate thresholds;
- ``gguf``: reading a GGUF's header, metadata and tensor table; adding its end-of-turn token;
- ``chat_template``: rendering a Hugging Face chat template exactly as transformers does;
- ``modelfile``: an Ollama Modelfile derived from a GGUF's own metadata;
- ``general_set``: a general-prompts file (JSON lines), the prompts and texts of bench's drift check;
- ``logits_cache``: the top-k log-prob cache bench's workers hand each other (versioned .npz).
"""
