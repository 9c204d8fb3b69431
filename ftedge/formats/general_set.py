"""A general-prompts file (JSON lines): the prompts and texts bench's drift-from-base check scores.

Each line is ``{"prompt": ..., "answer": ...}``, ``{"messages": [...]}`` (ending with a user turn, or with its
answer as a final assistant turn) or ``{"text": ...}``; the answer is optional; a line with only ``"about"`` is a
comment. ``ftedge/bench/general.jsonl`` (ftedge's own set) and a recipe's ``eval.general_prompts`` share it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge.errors import FtedgeError


@dataclass
class GeneralSet:
    """Chat prompts (``{"messages": [...], "answer": str | None}``) and plain paragraphs."""

    prompts: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def as_job(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "texts": self.texts}


def read_general(path: Path, into: GeneralSet | None = None) -> GeneralSet:
    """Prompts and texts of a general-set JSON-lines file; a bad row is a one-line error naming it."""
    out = into if into is not None else GeneralSet()
    path = Path(path)
    hint = 'write one {"prompt": ..., "answer": ...}, {"messages": [...]} or {"text": ...} object per line'
    if not path.is_file():
        raise FtedgeError(f"general prompts file {path} not found", hint="fix eval.general_prompts in the recipe")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FtedgeError(f"{path}: not UTF-8 text", hint=hint) from None
    before = len(out.prompts) + len(out.texts)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FtedgeError(f"{path}:{n}: not a JSON object per line ({err.msg})", hint=hint) from None
        if not isinstance(row, dict):
            raise FtedgeError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}", hint=hint)
        answer = row["answer"] if isinstance(row.get("answer"), str) and row["answer"].strip() else None
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.prompts.append({"messages": [{"role": "user", "content": row["prompt"]}], "answer": answer})
        elif isinstance(row.get("messages"), list) and row["messages"]:
            turns = list(row["messages"])
            ok = all(
                isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and isinstance(t.get("content"), str)
                for t in turns
            )
            if ok and len(turns) > 1 and turns[-1]["role"] == "assistant" and answer is None:
                answer = turns.pop()["content"]  # a conversation with its answer
            if not ok or turns[-1]["role"] != "user":
                raise FtedgeError(
                    f"{path}:{n}: messages must be {{role, content}} turns ending with a user turn (or its answer)", hint=hint
                )
            out.prompts.append({"messages": [{"role": t["role"], "content": t["content"]} for t in turns], "answer": answer})
        elif isinstance(row.get("text"), str) and row["text"].strip():
            out.texts.append(row["text"])
        elif "about" not in row:
            raise FtedgeError(f"{path}:{n}: no 'prompt', 'messages' or 'text'", hint=hint)
    if len(out.prompts) + len(out.texts) == before:
        raise FtedgeError(f"{path}: no prompts or texts", hint=hint)
    out.sources.append(str(path))
    return out
