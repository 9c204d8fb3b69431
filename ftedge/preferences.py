"""``ftedge data preferences RUN``: a run's own mistakes on its training rows as DPO preference pairs.

The run's tuned model (its merged model, through ``ftedge.backends``: the answers bench would get from
it) answers the first ``rows`` rows of the run's **training** split (the split frozen into the run at
train time; never a validation or test row), greedily up to its end-of-turn. Each answer that differs
from the gold one becomes a pair in the preference format a DPO recipe reads (``data.format:
preference``): ``prompt``, ``chosen`` = the gold answer, ``rejected`` = the model's answer.

The output folder holds:

- ``train.jsonl``: those pairs (a DPO run's training data);
- ``val.jsonl`` and ``test.jsonl``: the run's validation and test rows, in split order, as pairs with
  ``chosen`` = gold and ``rejected`` = another gold answer drawn with a fixed seed (another label, for a
  classifier). The model never answers them: a DPO run started from this run (``train.init_from``)
  validates on rows it never trained on and benches on the very test rows this run's bench scored;
- ``build.json``: what was answered, how many were right, how many pairs were made.

The prompt is the row's user text (its turns as a message list when there are several). A system turn
equal to the run's ``data.system_prompt`` is left out: the DPO recipe sets the same one. The folder is
written atomically (a new one replaces an earlier set as a whole).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.data.reading import Example
from ftedge.data.splits import Splits, run_splits
from ftedge.errors import FtedgeError, StageMissingError
from ftedge.manifest import Run

log = logging.getLogger(__name__)

DEFAULT_ROWS = 3000  # training rows answered (benchmarks/dpo_banking77.py measured DPO from 1,500 of them)
ANSWER_SLACK = 8  # tokens beyond the longest gold answer (end-of-turn included)
SEED = 0
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "build.json")


def default_out(run: Run) -> Path:
    """Where a run's preference set goes unless told: ``<run>-preferences`` beside the run folder."""
    return run.path.parent / f"{run.path.name}-preferences"


def _prompt(example: Example, system: str | None) -> str | list[dict[str, str]]:
    turns = [dict(m) for m in example.messages]
    if turns and turns[0]["role"] == "system" and turns[0]["content"] == system:
        turns = turns[1:]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return turns


def _other_answers(splits: Splits) -> list[str]:
    """What a held-out pair's ``rejected`` is drawn from: the labels (a classifier), else every gold answer of the run's rows."""
    if splits.labels:
        return list(splits.labels)
    return sorted({ex.target for part in (splits.train, splits.val, splits.test) for ex in part})


def _held_out_pairs(examples: Sequence[Example], answers: Sequence[str], system: str | None, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for ex in examples:
        others = [a for a in answers if a.strip() and a != ex.target]
        if not others:  # every answer is this one: no pair to make
            continue
        out.append({"prompt": _prompt(ex, system), "chosen": ex.target, "rejected": rng.choice(others)})
    return out


def model_answers(backend: Any, examples: Sequence[Example], *, progress: Callable[[], None] | None = None) -> list[str]:
    """Greedy answers of a loaded backend to each example's prompt, up to its end-of-turn (stripped)."""
    budget = max(len(backend.tokenize(ex.target)) for ex in examples) + 1 + ANSWER_SLACK
    out = []
    for ex in examples:
        out.append(backend.reply(ex.messages, max_new_tokens=budget).strip())
        if progress is not None:
            progress()
    return out


def _model(run: Run) -> Path:
    merged = run.artifact("merged")
    if merged is None or not merged.path.is_dir():
        raise StageMissingError(f"no merged model in {run.path}", hint=f"run `ftedge merge {run.path}` first")
    return merged.path


def _check_out(out: Path) -> None:
    """An existing OUT is replaced only when it is a preference set (nothing but its files): never a folder of other things."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / "build.json").is_file() or any(p.name not in FILES for p in out.iterdir()):
        raise FtedgeError(
            f"{out} exists and is not a preference set made by `ftedge data preferences`",
            hint="give another -o folder (it is written whole, replacing an earlier set)",
        )


def build_preferences(run: Run, out: Path | None = None, *, rows: int = DEFAULT_ROWS, threads: int | None = None) -> dict[str, Any]:
    """Answer the run's first ``rows`` training rows with its merged model; write the mistakes as preference pairs
    (plus its validation and test rows as pairs) into ``out``; return the figures written to ``build.json``."""
    if rows < 1:
        raise FtedgeError(f"--rows {rows}: answer at least one row", hint="e.g. --rows 3000")
    out = Path(out) if out is not None else default_out(run)
    _check_out(out)
    run.require("train", "trained model", "ftedge train --resume")
    model = _model(run)
    recipe = run.recipe()
    splits = run_splits(run)  # frozen at train time: refused in one line if the data file changed since
    if any(ex.raw for ex in splits.train):
        raise FtedgeError(f"{run.path}: rows without a prompt (raw text) cannot be answered", hint="use a run trained on chat data")
    train = splits.train[:rows]
    system = recipe.data.system_prompt
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ftedge.backends import load_backend

    t0 = time.time()
    log.info("answering %d training rows of %s with %s", len(train), run.path, model)
    columns = (TextColumn("preferences"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with load_backend(model, threads=threads) as backend, Progress(*columns, transient=True) as bar:
        task = bar.add_task("answering", total=len(train))
        said = model_answers(backend, train, progress=lambda: bar.advance(task))
    mistakes = [
        {"prompt": _prompt(ex, system), "chosen": ex.target, "rejected": answer}
        for ex, answer in zip(train, said, strict=True)
        if answer and answer != ex.target
    ]
    if not mistakes:
        raise FtedgeError(
            f"the model of {run.path} answered all {len(train)} training rows asked right (or gave no answer): no preference pairs",
            hint="answer more rows (--rows), or train DPO on another preference set",
        )
    rng = random.Random(SEED)
    answers = _other_answers(splits)
    files = {
        "train.jsonl": mistakes,
        "val.jsonl": _held_out_pairs(splits.val, answers, system, rng),
        "test.jsonl": _held_out_pairs(splits.test, answers, system, rng),
    }
    right = sum(answer == ex.target for ex, answer in zip(train, said, strict=True))
    stats = {
        "run": str(run.path),
        "model": str(model),
        "train_rows_answered": len(train),
        "train_accuracy": round(right / len(train), 4),
        "preference_pairs": len(mistakes),
        "not_a_label": sum(1 for r in mistakes if r["rejected"] not in splits.labels) if splits.labels else None,
        "val_pairs": len(files["val.jsonl"]),
        "test_pairs": len(files["test.jsonl"]),
        "seed": SEED,
        "seconds": round(time.time() - t0, 1),
    }
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        for name, pairs in files.items():
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
        (tmp / "build.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    log.info(
        "%s: %d preference pairs from %d training rows (%.1f%% answered right), %d validation and %d test pairs",
        out,
        len(mistakes),
        len(train),
        100 * stats["train_accuracy"],
        stats["val_pairs"],
        stats["test_pairs"],
    )
    return {**stats, "out": str(out)}
