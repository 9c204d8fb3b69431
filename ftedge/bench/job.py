"""The job the bench stage hands its worker process: one dataclass, written and read only here.

``bench.stage`` builds a :class:`BenchJob` and :meth:`BenchJob.write` s it; ``bench.worker`` reads it back with
:meth:`BenchJob.read`. The target travels as the typed :class:`ftedge.targets.Target` (threads, context, llama.cpp
runtime settings), not as loose keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.errors import FtedgeError
from ftedge.targets import Target

JOB_VERSION = 1


@dataclass(frozen=True)
class SpeedJob:
    """Speed protocol for one artifact: greedy decode of ``decode_tokens`` after ``messages``, ``repeats`` timed runs after ``warmup``."""

    messages: list[dict[str, str]]
    decode_tokens: int
    repeats: int
    warmup: int


@dataclass(frozen=True)
class BenchJob:
    """What one worker process measures on one artifact."""

    name: str
    path: str
    target: Target
    load: dict[str, Any] = field(default_factory=dict)  # how to load it: {"kind": "torch", "adapter": ..., ...} or backend options
    examples: list[dict[str, Any]] = field(default_factory=list)  # held-out rows {messages, target}
    task: str = "label_match"
    max_new_tokens: int | None = None
    speed: SpeedJob | None = None
    reference_out: str | None = None  # the reference writes its top-k logits here ...
    reference_in: str | None = None  # ... and every other artifact compares with them
    generate: int = 0  # greedy answers to the first N examples (chat data)
    general: dict[str, Any] | None = None  # the base model's run: the general set (prompts, texts) ...
    general_out: str | None = None  # ... and where its answers go
    general_in: str | None = None  # an artifact's run: the base's general-set file to measure drift from base against

    @property
    def threads(self) -> int:
        return self.target.threads

    @property
    def n_ctx(self) -> int:
        return self.target.n_ctx

    def as_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["target"] = self.target.model_dump(mode="json")
        doc["speed"] = asdict(self.speed) if self.speed is not None else None
        return {"version": JOB_VERSION, **doc}

    def write(self, path: Path) -> Path:
        atomic.write_json(Path(path), self.as_json())
        return Path(path)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BenchJob:
        doc = dict(doc)
        if doc.pop("version", None) != JOB_VERSION:
            raise FtedgeError(f"bench job of another ftedge version (this one reads version {JOB_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise FtedgeError(f"bench job: unknown key(s) {', '.join(unknown)}")
        doc["target"] = Target.model_validate(doc["target"])
        if doc.get("speed") is not None:
            doc["speed"] = SpeedJob(**doc["speed"])
        return cls(**doc)

    @classmethod
    def read(cls, path: Path) -> BenchJob:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise FtedgeError(f"bench job {path} cannot be read ({err})") from None
        return cls.from_json(doc)
