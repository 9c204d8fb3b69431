"""A top-k log-prob cache: what one bench worker saves from a reference model and other workers score against.

Token sequences, each with the reference's top-k next-token log-probs over a span of it (rows ``start``,
``start + 1``, ...: row j predicts token ``start + j + 1``), and optionally plain texts as token ids. Two
uses: the quality reference (every held-out conversation, ``start`` 0; an empty sequence stands for a row
that was skipped) and the drift-from-base file (each general prompt's answer span, plus general texts).

One ``.npz`` file (numpy's format; no pickles) with a versioned JSON header naming the format, its version
and the cache's ``kind``; ragged lists are stored flat with offsets. A file of another kind, another version
or no header is a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftedge import atomic
from ftedge.errors import FtedgeError

FORMAT = "ftedge-topk-cache"
VERSION = 1


@dataclass
class TopKCache:
    """Sequences with top-k log-probs over a span of each; ``texts`` are token ids of plain texts."""

    kind: str
    seqs: list[np.ndarray] = field(default_factory=list)  # int32 token ids per sequence
    starts: list[int] = field(default_factory=list)  # the position the first top-k row predicts from
    top_ids: list[np.ndarray] = field(default_factory=list)  # int32 [rows, k] per sequence
    top_logp: list[np.ndarray] = field(default_factory=list)  # float32 [rows, k] per sequence
    texts: list[np.ndarray] = field(default_factory=list)  # int32 token ids per text

    def add(self, seq: list[int] | np.ndarray, start: int, top_ids: np.ndarray, top_logp: np.ndarray) -> None:
        self.seqs.append(np.asarray(seq, dtype=np.int32))
        self.starts.append(int(start))
        self.top_ids.append(np.asarray(top_ids, dtype=np.int32))
        self.top_logp.append(np.asarray(top_logp, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.seqs)


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
    return np.cumsum([0, *(len(p) for p in parts)]).astype(np.int64)


def _flat(parts: list[np.ndarray], dtype: type, width: int | None = None) -> np.ndarray:
    parts = [p for p in parts if len(p)]  # empty entries (a skipped row) only move the offsets
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0,) if width is None else (0, width), dtype)


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def write_topk_cache(path: Path, cache: TopKCache) -> None:
    """Write ``cache`` to ``path`` atomically."""
    if not len(cache.seqs) == len(cache.starts) == len(cache.top_ids) == len(cache.top_logp):
        raise ValueError("a top-k cache needs one start and one top-k block per sequence")
    width = next((int(x.shape[-1]) for x in cache.top_ids if len(x)), 1)
    header = {"format": FORMAT, "version": VERSION, "kind": cache.kind}
    with atomic.atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                header=np.array(json.dumps(header)),
                seq_offsets=_offsets(cache.seqs),
                seqs=_flat(cache.seqs, np.int32),
                starts=np.asarray(cache.starts, dtype=np.int64),
                row_offsets=_offsets(cache.top_ids),
                top_ids=_flat(cache.top_ids, np.int32, width),
                top_logp=_flat(cache.top_logp, np.float32, width),
                text_offsets=_offsets(cache.texts),
                texts=_flat(cache.texts, np.int32),
            )


def read_topk_cache(path: Path, kind: str) -> TopKCache:
    """The cache of ``kind`` in ``path``; a one-line error for a missing, foreign or other-version file."""
    path = Path(path)
    hint = "delete it and run `ftedge bench` again"
    if not path.is_file():
        raise FtedgeError(f"top-k cache {path} not found", hint="run `ftedge bench` again")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise FtedgeError(f"{path} is not a readable top-k cache ({err})", hint=hint) from None
    try:
        header = json.loads(str(arrays["header"]))
    except (KeyError, ValueError):
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FtedgeError(f"{path} is not an ftedge top-k cache (no {FORMAT} header)", hint=hint)
    if header.get("version") != VERSION:
        raise FtedgeError(f"{path}: top-k cache version {header.get('version')} (this ftedge reads version {VERSION})", hint=hint)
    if header.get("kind") != kind:
        raise FtedgeError(f"{path} holds a {header.get('kind')} cache, not a {kind} one", hint=hint)
    return TopKCache(
        kind=kind,
        seqs=_split(arrays["seqs"], arrays["seq_offsets"]),
        starts=[int(s) for s in arrays["starts"].tolist()],
        top_ids=_split(arrays["top_ids"], arrays["row_offsets"]),
        top_logp=_split(arrays["top_logp"], arrays["row_offsets"]),
        texts=_split(arrays["texts"], arrays["text_offsets"]),
    )
