"""Disjoint train / validation / test splits, frozen into the run at train time.

Splits (:func:`load_splits`) are disjoint: **train** (the optimizer, and GPTQ calibration),
**validation** (early stopping, the best checkpoint, the parity gate's prompts) and **test** (only
``ftedge bench``). Each comes from its own file (``data.val``, ``data.test``) or is held out of
``data.train`` with a fixed seed: one shuffle, test rows first, then validation rows. Rows with the
same input (case, spacing and answer aside) always land in the same split, and a row of a separate
validation or test file (case and spacing aside) is left out of training, so the bench never
scores a row any stage has seen. The case- and spacing-insensitive keys decide the split only;
every row is trained and scored as written.

The train stage freezes the splits into the run (:func:`freeze_splits`): ``splits.json`` holds, per
data file, its path and sha256, and per split the rows as ``[file, row, sha256]`` (the file's role
``train``/``val``/``test``, the row's 0-based position among the file's rows, and the sha256 of the
row as read), in split order. Every later stage reads the splits through the run
(:func:`run_splits`): the same rows, read back from the data files, or a one-line refusal naming the
file when a frozen row changed or is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.data.reading import Example, read_rows, row_to_example
from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.recipe import DataConfig, Recipe

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"  # in the run folder, recorded as artifact "splits" (stage train)
SPLITS_ARTIFACT = "splits"
SPLITS_SCHEMA = 1
SPLIT_NAMES = ("train", "val", "test", "left_out")


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    labels: list[str] = field(default_factory=list)  # text_label: the label set (sorted)
    test: list[Example] = field(default_factory=list)
    left_out: list[Example] = field(default_factory=list)  # training rows also given as validation/test rows: not trained on


# --------------------------------------------------------------------------- split keys
def normalize(text: str) -> str:
    """Case- and spacing-insensitive form of a text (what "the same input" means)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_key(example: Example) -> str:
    """What makes two examples the same row for the split: prompt turns, answer and kind, each text case- and
    spacing-normalized (not where they were read)."""
    turns = [[m["role"], normalize(m["content"])] for m in example.messages]
    return json.dumps([turns, normalize(example.target), example.raw], ensure_ascii=False)


def prompt_text(example: Example) -> str:
    """The input of an example: its non-system turns (the system prompt is the same on every row)."""
    return "\n".join(m["content"] for m in example.messages if m["role"] != "system")


def input_key(example: Example) -> str:
    """What makes two rows the same input, whatever their answers: the normalized prompt turns (raw text rows: the text)."""
    return normalize(prompt_text(example) if not example.raw else example.target)


# --------------------------------------------------------------------------- splitting
def _groups(examples: list[Example], seed: int) -> list[list[Example]]:
    """Examples grouped by input (repeated and conflicting rows together), in a fixed-seed shuffled order: a held-out
    input never also occurs in training, even with other case, spacing or answer."""
    by_key: dict[str, list[Example]] = {}
    for ex in examples:
        by_key.setdefault(input_key(ex), []).append(ex)
    groups = list(by_key.values())
    random.Random(seed).shuffle(groups)
    return groups


def _count(n_groups: int, fraction: float) -> int:
    return max(1, round(n_groups * fraction)) if fraction > 0 else 0


@dataclass
class _File:
    """One data file as read: its role (train/val/test), rows ``(where, row)`` and their examples."""

    role: str
    path: Path
    rows: list[tuple[str, dict[str, Any]]]
    examples: list[Example]


def _read_file(role: str, path: Path, cfg: DataConfig) -> _File:
    rows = read_rows(path)
    return _File(role, Path(path), rows, [row_to_example(row, where, cfg) for where, row in rows])


def _files(cfg: DataConfig) -> list[_File]:
    """The recipe's data files, read: ``data.train``, then ``data.test`` and ``data.val`` where given."""
    train = _read_file("train", cfg.train, cfg)
    if not train.rows:
        raise FtedgeError(f"data file {cfg.train} has no rows", hint="check the file (a CSV needs a header row and data rows)")
    out = [train]
    for role, path, what in (("test", cfg.test, "test"), ("val", cfg.val, "validation")):
        if path is None:
            continue
        read = _read_file(role, path, cfg)
        if not read.rows:
            raise FtedgeError(f"{what} file {path} has no rows", hint=f"add rows or drop data.{role} to hold out a fraction of data.train")
        out.append(read)
    return out


def _split(
    examples: list[Example], cfg: DataConfig, source: Path, given: dict[str, list[Example]]
) -> tuple[list[Example], list[Example], list[Example], list[Example]]:
    """(train, val, test, left_out): ``given`` val/test files where given, else fixed-seed held-out groups of ``examples``
    (test first); ``left_out``: training rows that are also validation or test rows, kept out of training."""
    groups = _groups(examples, cfg.seed)
    n_test = 0 if cfg.test is not None else _count(len(groups), cfg.test_fraction)
    n_val = 0 if cfg.val is not None else _count(len(groups), cfg.val_fraction)
    if n_test + n_val >= len(groups):
        raise FtedgeError(
            f"{source}: {len(examples)} rows are too few to hold out test_fraction={cfg.test_fraction} and val_fraction={cfg.val_fraction}",
            hint="add rows, lower data.test_fraction / data.val_fraction, or give data.test / data.val files",
        )
    flat = [[ex for g in part for ex in g] for part in (groups[:n_test], groups[n_test : n_test + n_val], groups[n_test + n_val :])]
    test, val, train = flat
    test = given.get("test", test)
    val = given.get("val", val)
    seen = {content_key(ex) for ex in test}
    left_out: list[Example] = []
    for name, part in (("validation", val), ("training", train)):
        kept = [ex for ex in part if content_key(ex) not in seen]
        if len(kept) < len(part):
            log.warning("%d %s rows are also test rows: left out of %s", len(part) - len(kept), name, name)
            if part is train:
                left_out += [ex for ex in part if content_key(ex) in seen]
            part[:] = kept
    if cfg.val is not None:
        seen |= {content_key(ex) for ex in val}
        kept = [ex for ex in train if content_key(ex) not in seen]
        if len(kept) < len(train):
            log.warning("%d training rows are also validation rows: left out of training", len(train) - len(kept))
            left_out += [ex for ex in train if content_key(ex) in seen]
            train = kept
    if not train:
        raise FtedgeError(f"{source}: no training rows left after the validation and test splits", hint="give data.train more rows")
    return train, val, test, left_out


def _labels(cfg: DataConfig, examples: list[Example], val: list[Example], test: list[Example]) -> list[str]:
    if cfg.format != "text_label":
        return []
    labels = sorted({e.target for e in examples} | {e.target for e in val} | {e.target for e in test})
    if len(labels) < 2:
        raise FtedgeError(
            f"{cfg.train}: label field {cfg.label_field!r} has a single class ({labels[0]!r})",
            hint="a classifier needs at least two labels; check data.label_field",
        )
    return labels


def _load(recipe: Recipe) -> tuple[Splits, list[_File]]:
    cfg = recipe.data
    files = _files(cfg)
    examples = files[0].examples
    given = {f.role: list(f.examples) for f in files[1:]}
    train, val, test, left_out = _split(examples, cfg, cfg.train, given)
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    return Splits(train=train, val=val, labels=_labels(cfg, examples, val, test), test=test, left_out=left_out), files


def load_splits(recipe: Recipe) -> Splits:
    """Disjoint train / validation / test examples: held out of ``data.train`` with a fixed seed, or from ``data.val`` / ``data.test``.

    This splits the data files as they are now; a stage working on a trained run reads the splits frozen
    into it with :func:`run_splits`.
    """
    return _load(recipe)[0]


# --------------------------------------------------------------------------- frozen into the run
def row_hash(row: dict[str, Any]) -> str:
    """sha256 of a row as read from its file (its fields and values, whatever the recipe makes of them)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    return atomic.digest_path(path)[1]


def _frozen_doc(splits: Splits, files: list[_File]) -> dict[str, Any]:
    place: dict[str, tuple[str, int, str]] = {}
    for f in reversed(files):  # the same file given twice: its train role wins
        for i, (where, row) in enumerate(f.rows):
            place[where] = (f.role, i, row_hash(row))
    parts = {name: [list(place[ex.source]) for ex in getattr(splits, name)] for name in SPLIT_NAMES}
    return {
        "schema": SPLITS_SCHEMA,
        "files": {f.role: {"path": str(f.path.resolve()), "sha256": _file_sha256(f.path), "rows": len(f.rows)} for f in files},
        "labels": splits.labels,
        "splits": parts,
    }


def _dump(doc: dict[str, Any]) -> str:
    """splits.json: readable, one row per line."""
    head = {k: v for k, v in doc.items() if k != "splits"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()] + ['  "splits": {']
    names = list(doc["splits"])
    for n, name in enumerate(names):
        rows = doc["splits"][name]
        end = "," if n < len(names) - 1 else ""
        if not rows:
            lines.append(f"    {json.dumps(name)}: []{end}")
            continue
        lines.append(f"    {json.dumps(name)}: [")
        lines += [f"      {json.dumps(r)}{',' if i < len(rows) - 1 else ''}" for i, r in enumerate(rows)]
        lines.append(f"    ]{end}")
    return "\n".join([*lines, "  }", "}"]) + "\n"


def freeze_splits(run: Run) -> Splits:
    """Split the run's data files and freeze the result into the run (``splits.json``, artifact ``splits``); returns the splits."""
    splits, files = _load(run.recipe())
    path = run.path / SPLITS_FILE
    atomic.write_text(path, _dump(_frozen_doc(splits, files)))
    run.record_artifact(SPLITS_ARTIFACT, path, stage="train", format="splits", **{name: len(getattr(splits, name)) for name in SPLIT_NAMES})
    return splits


def _changed(run: Run, path: Path, detail: str) -> FtedgeError:
    return FtedgeError(
        f"data file {path} changed since run {run.path} was trained: {detail}",
        hint=f"put back the data the run was trained on, or train a new run on the changed data: `ftedge train {run.path}/recipe.yaml`",
    )


def _thaw_file(run: Run, info: dict[str, Any], frozen: dict[int, str], cfg: DataConfig) -> dict[int, Example]:
    """The ``frozen`` rows (position -> sha256) of one data file, as examples; refuses when one changed or is gone."""
    path = Path(info["path"])
    if not path.exists():
        raise _changed(run, path, "the file is gone")
    rows = read_rows(path)
    if _file_sha256(path) != info.get("sha256"):
        bad = [i for i in sorted(frozen) if i >= len(rows) or row_hash(rows[i][1]) != frozen[i]]
        if bad:
            first = bad[0]
            where = rows[first][0] if first < len(rows) else f"row {first + 1} (the file now has {len(rows)} rows)"
            raise _changed(run, path, f"{len(bad)} of the {len(frozen)} rows its splits hold changed or are gone (first: {where})")
        log.info("data file %s changed since training, but every row of the run's splits is unchanged (new rows are in no split)", path)
    return {i: row_to_example(rows[i][1], rows[i][0], cfg) for i in sorted(frozen)}


def _read_frozen(run: Run) -> dict[str, Any] | None:
    art = run.artifact(SPLITS_ARTIFACT)
    if art is None:
        return None
    try:
        doc = json.loads(art.path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FtedgeError(
            f"{art.path} cannot be read ({err})",
            hint=f"the run's frozen splits are damaged; train a new run: `ftedge train {run.path}/recipe.yaml`",
        ) from None
    if not isinstance(doc, dict) or doc.get("schema") != SPLITS_SCHEMA or not isinstance(doc.get("splits"), dict):
        raise FtedgeError(
            f"{art.path} is not an ftedge splits file (schema {SPLITS_SCHEMA})",
            hint=f"train a new run: `ftedge train {run.path}/recipe.yaml`",
        )
    return doc


def run_splits(run: Run) -> Splits:
    """The splits frozen into the run at train time, read back from the data files.

    Refuses in one line when a data file no longer holds a frozen row as it was (changed, or gone). A run
    trained before splits were frozen (no ``splits`` artifact) is split from its data files as they are now.
    """
    doc = _read_frozen(run)
    recipe = run.recipe()
    if doc is None:
        if run.is_done("train"):
            log.warning("%s has no frozen splits (trained by an older ftedge): splitting its data files as they are now", run.path)
        return load_splits(recipe)
    frozen: dict[str, dict[int, str]] = {}
    for name in SPLIT_NAMES:
        for role, i, digest in doc["splits"].get(name, []):
            frozen.setdefault(role, {})[int(i)] = str(digest)
    examples = {role: _thaw_file(run, doc["files"][role], rows, recipe.data) for role, rows in frozen.items()}
    parts = {name: [examples[role][int(i)] for role, i, _ in doc["splits"].get(name, [])] for name in SPLIT_NAMES}
    return Splits(
        train=parts["train"], val=parts["val"], labels=list(doc.get("labels", [])), test=parts["test"], left_out=parts["left_out"]
    )


# --------------------------------------------------------------------------- checks
def check_dataset(recipe: Recipe) -> str:
    """Cheap checks before any model loads; returns a one-line summary and logs the label warnings."""
    splits = load_splits(recipe)
    cfg = recipe.data
    val = f"val {cfg.val.name} ({len(splits.val)})" if cfg.val is not None else f"val {len(splits.val)} held out"
    test = f"test {cfg.test.name} ({len(splits.test)})" if cfg.test is not None else f"test {len(splits.test)} held out"
    summary = f"data: {len(splits.train)} train rows, {val}, {test} (seed {cfg.seed}), format {cfg.format}"
    if splits.labels:
        summary += f", {len(splits.labels)} labels"
        for warning in label_warnings([e.target for e in splits.train], [e.target for e in splits.val], "validation"):
            _warn_once(warning)
    return summary


def label_warnings(train_labels: Sequence[str], other_labels: Sequence[str], what: str) -> list[str]:
    """What a classifier's labels warn of: a label seen once in training, labels of ``what`` never seen in training.

    ``train_labels`` has one entry per training example (counts matter); ``other_labels`` are the labels
    a model is scored on (the validation split, a bench data file). Returns one line per warning.
    """
    counts = Counter(train_labels)
    out = []
    once = sorted(label for label, n in counts.items() if n == 1)
    if once:
        out.append(
            f"{len(once)} label{'s' if len(once) > 1 else ''} appear{'' if len(once) > 1 else 's'} only once in the training data "
            f"({_some(once)}): one example is rarely enough to learn a label"
        )
    scored = sorted(set(other_labels))
    unseen = [label for label in scored if label not in counts]
    if unseen and len(unseen) == len(scored):
        out.append(f"{what}: none of its {len(scored)} labels appear in the training data ({_some(unseen)}): its accuracy will be 0")
    elif unseen:
        out.append(
            f"{what}: {len(unseen)} of its {len(scored)} labels never appear in the training data ({_some(unseen)}): "
            "the model cannot have learned them"
        )
    return out


def _some(labels: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(label) for label in labels[:n])
    return shown + (f" and {len(labels) - n} more" if len(labels) > n else "")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a data warning once per process (validation and the train stage both check the data)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)
