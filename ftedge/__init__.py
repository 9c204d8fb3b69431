"""ftedge: QLoRA-tune a small causal LM, merge, export GGUF/ONNX and benchmark on the edge."""

__version__ = "0.1.0"
