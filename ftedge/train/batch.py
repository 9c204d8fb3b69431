"""Micro-batches of tokenized rows for the training loop (packed or padded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftedge.data.encoding import IGNORE, Encoded


def make_batch(
    rows: Sequence[Encoded], *, max_length: int, packing: bool, pad_id: int = 0, segments: bool = False, one_row: bool = False
) -> dict[str, Any]:
    """Tensors for one micro-batch; labels are already aligned to inputs (the loss shifts them).

    With ``packing``, examples are laid end to end in rows of at most ``max_length`` tokens
    and ``position_ids`` restart at 0 for each example: with no attention mask, transformers
    turns that into a block-diagonal mask, so no token attends across examples. Padding
    (only at row ends) forms its own block and carries no loss. With ``one_row`` too, every
    example goes in a single row with no padding at all; the attention must then keep the
    examples apart itself (``ftedge.train.model``'s packed attention does, from the position
    ids). Without packing, one example per row, right-padded, with an attention mask.
    ``segments`` adds, per position, the index of its example in ``rows`` (-1 on padding), for
    per-example sums (DPO).
    """
    import torch

    if packing and one_row:
        groups = [list(range(len(rows)))]
    elif packing:
        packed: list[list[int]] = [[]]
        used = 0
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            if packed[-1] and used + n > max_length:
                packed.append([])
                used = 0
            packed[-1].append(i)
            used += n
        groups = packed
    else:
        groups = [[i] for i in range(len(rows))]
    width = max(sum(len(rows[i].input_ids) for i in g) for g in groups)
    ids, labels, pos, mask, seg = [], [], [], [], []
    for g in groups:
        gi = [t for i in g for t in rows[i].input_ids]
        gl = [t for i in g for t in rows[i].labels]
        gp = [p for i in g for p in range(len(rows[i].input_ids))]
        pad = width - len(gi)
        ids.append(gi + [pad_id] * pad)
        labels.append(gl + [IGNORE] * pad)
        pos.append(gp + list(range(pad)))
        mask.append([1] * len(gi) + [0] * pad)
        seg.append([i for i in g for _ in rows[i].input_ids] + [-1] * pad)
    batch: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if segments:
        batch["segments"] = torch.tensor(seg)
    if packing:
        batch["position_ids"] = torch.tensor(pos)
    else:
        batch["attention_mask"] = torch.tensor(mask)
    batch["n_tokens"] = sum(len(r.input_ids) for r in rows)
    return batch
