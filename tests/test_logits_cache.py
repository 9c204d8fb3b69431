"""The top-k log-prob cache bench's workers hand each other (ftedge/formats/logits_cache.py): round trip, versioned header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ftedge.errors import FtedgeError
from ftedge.formats.logits_cache import VERSION, TopKCache, read_topk_cache, write_topk_cache


def _cache(rng: np.random.Generator, k: int = 4) -> TopKCache:
    cache = TopKCache("quality-reference")
    for n, start in ((7, 0), (0, 0), (5, 2)):  # the empty one: a row the writer skipped
        rows = max(n - 1 - start, 0)
        cache.add(rng.integers(0, 1000, n), start, rng.integers(0, 1000, (rows, k)), rng.normal(size=(rows, k)))
    cache.texts = [rng.integers(0, 1000, 9).astype(np.int32), rng.integers(0, 1000, 3).astype(np.int32)]
    return cache


def test_round_trip_keeps_every_sequence_row_and_text(tmp_path: Path) -> None:
    cache = _cache(np.random.default_rng(0))
    write_topk_cache(tmp_path / "c.npz", cache)
    back = read_topk_cache(tmp_path / "c.npz", "quality-reference")
    assert len(back) == 3 and back.starts == [0, 0, 2]
    for name in ("seqs", "top_ids", "top_logp", "texts"):
        mine, theirs = getattr(cache, name), getattr(back, name)
        assert len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True)), name
    assert back.top_logp[0].dtype == np.float32 and back.seqs[0].dtype == np.int32 and len(back.seqs[1]) == 0


def test_foreign_old_or_other_kind_files_are_one_line_errors(tmp_path: Path) -> None:
    write_topk_cache(tmp_path / "c.npz", _cache(np.random.default_rng(1)))
    with pytest.raises(FtedgeError, match="holds a quality-reference cache, not a drift-base one"):
        read_topk_cache(tmp_path / "c.npz", "drift-base")
    old = tmp_path / "old.npz"  # the layout bench wrote before the header existed
    np.savez(old, offsets=np.zeros(1, np.int64), row_offsets=np.zeros(1, np.int64), ids=np.zeros(0, np.int32))
    with pytest.raises(FtedgeError, match="not an ftedge top-k cache"):
        read_topk_cache(old, "quality-reference")
    newer = tmp_path / "newer.npz"
    with np.load(tmp_path / "c.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["header"] = np.array(str(arrays["header"]).replace(f'"version": {VERSION}', f'"version": {VERSION + 1}'))
    np.savez(newer, **arrays)
    with pytest.raises(FtedgeError, match=f"version {VERSION + 1}"):
        read_topk_cache(newer, "quality-reference")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FtedgeError, match="not a readable top-k cache"):
        read_topk_cache(tmp_path / "junk.npz", "quality-reference")
    with pytest.raises(FtedgeError, match="not found"):
        read_topk_cache(tmp_path / "missing.npz", "quality-reference")
