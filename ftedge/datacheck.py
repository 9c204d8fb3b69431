"""``ftedge data check``: what is wrong with a recipe's data, before it costs a training run.

Checks, on the splits ``load_splits`` returns (train, validation, and test where the recipe has one):

- ``unreadable``: rows that cannot become examples (a missing or empty answer, a bad message list), all listed;
- ``duplicates``: the same input with the same answer more than once in a split (ignoring case and spacing),
  and the same input with *different* answers (conflicting labels);
- ``near_duplicates``: inputs that are almost the same (MinHash over character 4-grams, ``datasketch``,
  estimated Jaccard similarity >= 0.8) within a split;
- ``leakage``: validation/test inputs that also occur in training, exactly or nearly: their scores
  measure memory, not generalization (``--strict`` fails on exact leakage);
- ``labels`` (``text_label``): counts per label, rare labels (fewer than a quarter of the median
  count), validation/test labels never seen in training;
- ``empty_answers``: answers that are empty or only whitespace;
- ``too_long``: rows longer than ``train.max_length`` tokens in the base model's own chat template
  (those are truncated in training);
- ``encoding``: mojibake (UTF-8 read as Latin-1/cp1252, found with ``ftfy``), U+FFFD replacement
  characters, control characters: signs of files saved in mixed encodings.

Grouping is pandas; the result is a :class:`DataReport` (a rich table for people, JSON for scripts).
The train stage runs the same checks (without the token count, which the encoder reports itself)
and logs each finding as a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftedge.data.reading import Example, read_rows, row_to_example
from ftedge.data.splits import Splits, load_splits, normalize, prompt_text
from ftedge.errors import FtedgeError
from ftedge.recipe import Recipe

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # the split attributes of ``Splits`` checked when present
NEAR_THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE = 4
RARE_FRACTION = 0.25
SHOWN = 5  # examples listed per finding
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class Finding:
    """One check's result: ``status`` ok / warning / error, a one-line ``summary`` and JSON-able ``details``."""

    check: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataReport:
    recipe: str
    rows: dict[str, int]
    findings: list[Finding]

    def finding(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    @property
    def leakage(self) -> bool:
        """Exact leakage: a validation/test input that is also a training input."""
        found = self.finding("leakage")
        return bool(found and found.details.get("exact"))

    def warnings(self) -> list[str]:
        return [f"{f.check}: {f.summary}" for f in self.findings if f.status != "ok"]

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "rows": self.rows, "findings": [asdict(f) for f in self.findings]}

    def table(self) -> Any:
        """The findings as a rich Table."""
        from rich.table import Table

        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        table = Table(title=f"data check: {self.recipe} ({rows})", title_justify="left")
        table.add_column("check")
        table.add_column("status")
        table.add_column("finding", overflow="fold")
        style = {"ok": "green", "warning": "yellow", "error": "red"}
        for f in self.findings:
            shown = f.summary
            examples = f.details.get("examples")
            if examples:
                shown += "\n" + "\n".join(f"  {e}" for e in examples[:SHOWN])
            table.add_row(f.check, f"[{style.get(f.status, '')}]{f.status}[/]", shown)
        return table


# --------------------------------------------------------------------------- helpers
def _shingles(text: str) -> list[bytes]:
    text = normalize(text)
    if len(text) <= SHINGLE:
        return [text.encode()]
    return [text[i : i + SHINGLE].encode() for i in range(len(text) - SHINGLE + 1)]


def _frame(splits: dict[str, list[Example]]) -> Any:
    import pandas as pd

    records = [
        {
            "split": name,
            "where": Path(ex.source).name,  # file:row, without the folder
            "input": prompt_text(ex),
            "key": normalize(prompt_text(ex)),
            "answer": ex.target.strip(),
            "rejected": (ex.rejected or "").strip(),
        }
        for name, rows in splits.items()
        for ex in rows
    ]
    return pd.DataFrame(records, columns=["split", "where", "input", "key", "answer", "rejected"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- checks
def unreadable_rows(recipe: Recipe) -> Finding:
    """Every row of the data files that cannot become an example (the train stage stops at the first)."""
    cfg = recipe.data
    files = [p for p in (cfg.train, cfg.val, getattr(cfg, "test", None)) if p is not None]
    bad: list[str] = []
    for path in files:
        for where, row in read_rows(Path(path)):
            try:
                row_to_example(row, where, cfg)
            except FtedgeError as err:
                bad.append(err.message)
    if not bad:
        return Finding("unreadable", "ok", "every row reads")
    return Finding("unreadable", "error", f"{_plural(len(bad), 'row')} cannot be read", {"count": len(bad), "examples": bad[:SHOWN]})


def duplicates(df: Any) -> Finding:
    same = df[df.duplicated(["split", "key", "answer", "rejected"], keep="first")]
    answers = df.groupby(["split", "key"])["answer"].nunique()
    conflicts = answers[answers > 1]
    details: dict[str, Any] = {
        "exact": int(len(same)),
        "by_split": {str(k): int(v) for k, v in same["split"].value_counts().items()},
        "conflicting_inputs": int(len(conflicts)),
        "examples": [f"{r.where}: {r.input[:80]!r}" for r in same.head(SHOWN).itertuples()],
    }
    if conflicts.size:
        details["conflicts"] = [f"{k[0]}: {k[1][:80]!r}" for k in conflicts.index[:SHOWN]]
    if not len(same) and not conflicts.size:
        return Finding("duplicates", "ok", "no repeated rows", details)
    parts = []
    if len(same):
        parts.append(f"{_plural(len(same), 'repeated row')} ({', '.join(f'{k} {v}' for k, v in details['by_split'].items())})")
    if conflicts.size:
        parts.append(f"{_plural(int(conflicts.size), 'input')} with different answers")
        details["examples"] = details["examples"][: SHOWN - 2] + [f"conflict in {c}" for c in details["conflicts"][:2]]
    return Finding("duplicates", "warning", "; ".join(parts), details)


def _minhashes(texts: Sequence[str]) -> list[Any]:
    import zlib

    from datasketch import MinHash

    # crc32 (C) instead of datasketch's default sha1 (Python per shingle): ~4x faster, and 32 bits are what MinHash uses.
    return MinHash.bulk([_shingles(t) for t in texts], num_perm=NUM_PERM, hashfunc=zlib.crc32)


def near_duplicates(df: Any, hashes: dict[int, Any]) -> tuple[Finding, Any]:
    """Near-duplicate inputs within each split; returns the finding and the training rows' LSH index (for leakage)."""
    from datasketch import MinHashLSH

    pairs: list[tuple[int, int, float]] = []
    train_lsh = None
    for split, part in df.groupby("split", sort=False):
        lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
        firsts = part.drop_duplicates("key")  # exact repeats are the duplicates check's
        for i in firsts.index:
            for j in lsh.query(hashes[i]):
                similarity = hashes[i].jaccard(hashes[j])
                if similarity >= NEAR_THRESHOLD:
                    pairs.append((j, i, similarity))
            lsh.insert(i, hashes[i])
        if split == "train":
            train_lsh = lsh
    details = {
        "pairs": len(pairs),
        "threshold": NEAR_THRESHOLD,
        "examples": [
            f"{df.at[i, 'where']} ~ {df.at[j, 'where']}: {df.at[i, 'input'][:50]!r} / {df.at[j, 'input'][:50]!r}"
            for i, j, _ in pairs[:SHOWN]
        ],
    }
    if not pairs:
        return Finding("near_duplicates", "ok", f"no near-duplicate inputs (similarity >= {NEAR_THRESHOLD})", details), train_lsh
    rows = len({i for p in pairs for i in p[:2]})
    summary = f"{_plural(len(pairs), 'near-duplicate pair')} over {_plural(rows, 'row')} (similarity >= {NEAR_THRESHOLD})"
    return Finding("near_duplicates", "warning", summary, details), train_lsh


def leakage(df: Any, hashes: dict[int, Any], train_lsh: Any, *, left_out: int = 0) -> Finding:
    """Held-out inputs also in training; ``left_out``: how many of those training rows ftedge already keeps out of training."""
    train = df[df["split"] == "train"]
    held = df[df["split"] != "train"]
    if held.empty:
        return Finding("leakage", "ok", "no validation/test split to leak into")
    train_keys = set(train["key"])
    exact = held[held["key"].isin(train_keys)]
    near: list[int] = []
    if train_lsh is not None:
        for i in held.index.difference(exact.index):
            if any(hashes[i].jaccard(hashes[j]) >= NEAR_THRESHOLD for j in train_lsh.query(hashes[i])):
                near.append(i)
    details = {
        "exact": int(len(exact)),
        "near": len(near),
        "by_split": {str(k): int(v) for k, v in exact["split"].value_counts().items()},
        "examples": [f"{r.where}: {r.input[:80]!r} (also in train)" for r in exact.head(SHOWN).itertuples()]
        + [f"{df.at[i, 'where']}: {df.at[i, 'input'][:80]!r} (nearly in train)" for i in near[: max(0, SHOWN - len(exact))]],
    }
    if not len(exact) and not near:
        return Finding("leakage", "ok", "no validation/test input occurs in training", details)
    splits = ", ".join(f"{k} {v}" for k, v in details["by_split"].items())
    if len(exact):
        summary = f"{_plural(len(exact), 'held-out row')} also in training{f' ({splits})' if splits else ''}"
        summary += f", {len(near)} more nearly" if near else ""
    else:
        summary = f"{_plural(len(near), 'held-out row')} nearly in training"
    if left_out:
        details["left_out_of_training"] = left_out
        summary += f" ({left_out} identical training rows are left out of training)"
    return Finding("leakage", "warning", summary + ": their scores measure memory, not generalization", details)


def label_balance(df: Any) -> Finding:
    train = df[df["split"] == "train"]
    counts = train["answer"].value_counts()
    median = float(counts.median()) if len(counts) else 0.0
    rare = counts[(counts < RARE_FRACTION * median) | (counts == 1)]
    held = df[df["split"] != "train"]
    unseen = sorted(set(held["answer"]) - set(counts.index))
    details = {
        "labels": int(len(counts)),
        "counts": {str(k): int(v) for k, v in counts.items()},
        "min": int(counts.min()) if len(counts) else 0,
        "median": median,
        "max": int(counts.max()) if len(counts) else 0,
        "rare": {str(k): int(v) for k, v in rare.items()},
        "unseen": unseen,
    }
    summary = (
        f"{len(counts)} labels in training, {details['min']}-{details['max']} rows each (median {median:g}, "
        f"max/min {details['max'] / max(1, details['min']):.1f}x)"
    )
    problems = []
    if len(rare):
        problems.append(f"{_plural(len(rare), 'rare label')} (< {RARE_FRACTION:g} x median): {', '.join(map(str, rare.index[:SHOWN]))}")
    if unseen:
        problems.append(f"{_plural(len(unseen), 'held-out label')} never seen in training: {', '.join(unseen[:SHOWN])}")
    if problems:
        return Finding("labels", "warning", summary + "; " + "; ".join(problems), details)
    return Finding("labels", "ok", summary, details)


def empty_answers(df: Any, preference: bool) -> Finding:
    empty = df[(df["answer"] == "") | ((df["rejected"] == "") if preference else False)]
    details = {"count": int(len(empty)), "examples": list(empty["where"].head(SHOWN))}
    if empty.empty:
        return Finding("empty_answers", "ok", "no empty answer", details)
    return Finding("empty_answers", "warning", f"{_plural(len(empty), 'row')} with an empty or whitespace answer", details)


def too_long(splits: dict[str, list[Example]], tokenizer: Any, max_length: int) -> Finding:
    from ftedge.data.encoding import ChatEncoder

    enc = ChatEncoder(tokenizer, max_length)
    over: list[str] = []
    longest = 0
    lengths: list[int] = []
    for rows in splits.values():
        n = enc.n_tokens(rows)
        lengths += n
        longest = max([longest, *n])
        over += [f"{ex.source}: {k} tokens" for ex, k in zip(rows, n, strict=True) if k > max_length]
    lengths.sort()
    p95 = lengths[int(0.95 * (len(lengths) - 1))] if lengths else 0
    details = {"max_length": max_length, "over": len(over), "longest": longest, "p95": p95, "examples": over[:SHOWN]}
    summary = f"longest row {longest} tokens, 95% within {p95} (train.max_length {max_length})"
    if over:
        return Finding(
            "too_long", "warning", f"{_plural(len(over), 'row')} over train.max_length (truncated in training); " + summary, details
        )
    return Finding("too_long", "ok", summary, details)


def encodings(df: Any) -> Finding:
    from ftfy.badness import is_bad

    kinds: dict[str, list[str]] = {"mojibake": [], "replacement_char": [], "control_char": []}
    for r in df.itertuples():
        text = f"{r.input}\n{r.answer}\n{r.rejected}"
        if "\ufffd" in text:
            kinds["replacement_char"].append(r.where)
        if CONTROL.search(text):
            kinds["control_char"].append(r.where)
        if is_bad(text):
            kinds["mojibake"].append(r.where)
    found = {k: v for k, v in kinds.items() if v}
    details = {k: len(v) for k, v in kinds.items()} | {"examples": [f"{w} ({k})" for k, v in found.items() for w in v[:2]][:SHOWN]}
    if not found:
        return Finding("encoding", "ok", "no mojibake, replacement or control characters", details)
    parts = ", ".join(f"{_plural(len(v), 'row')} with {k.replace('_', ' ')}" for k, v in found.items())
    return Finding("encoding", "warning", parts + " (mixed encodings? fix with ftfy.fix_text and save as UTF-8)", details)


# --------------------------------------------------------------------------- entry point
def check_data(recipe: Recipe, *, tokenizer: Any = None, splits: Splits | None = None, source: str | None = None) -> DataReport:
    """Every check on the recipe's data; ``tokenizer`` (the base model's) adds the token-length check."""
    name = source or recipe.name
    unreadable = unreadable_rows(recipe)
    if unreadable.status != "ok":
        return DataReport(name, {}, [unreadable])
    splits = splits or load_splits(recipe)
    parts = {s: list(getattr(splits, s)) for s in SPLITS if getattr(splits, s, None)}
    if splits.left_out:  # the training data as given: rows also held out are reported as leakage (training skips them)
        parts["train"] = parts.get("train", []) + splits.left_out
    df = _frame(parts)
    hashes = dict(zip(df.index, _minhashes(list(df["input"])), strict=True))
    near, train_lsh = near_duplicates(df, hashes)
    findings = [unreadable, duplicates(df), near, leakage(df, hashes, train_lsh, left_out=len(splits.left_out))]
    if recipe.data.format == "text_label":
        findings.append(label_balance(df))
    findings.append(empty_answers(df, recipe.data.format == "preference"))
    if tokenizer is not None:
        findings.append(too_long(parts, tokenizer, recipe.train.max_length))
    findings.append(encodings(df))
    return DataReport(name, {s: len(v) for s, v in parts.items()}, findings)
