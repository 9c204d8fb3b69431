"""Training data: read rows, turn them into chat examples, tokenize with loss masks.

Files: ``.csv``, ``.jsonl`` / ``.json`` (a list or JSON lines), and local Hugging Face
datasets (a ``save_to_disk`` folder, ``.parquet`` or ``.arrow``; needs the ``datasets``
package). Formats (``data.format``):

- ``messages``: a list of ``{role, content}`` turns (OpenAI style; a JSON string in CSV);
- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``completion``: ``prompt`` + ``completion`` (a chat turn), or ``text`` alone (raw text,
  every token trained, no chat template);
- ``text_label``: a text and a label; the label is the assistant's answer;
- ``preference``: a prompt with a ``chosen`` and a ``rejected`` answer (DPO). The prompt is a
  string or a message list; without a prompt, ``chosen`` and ``rejected`` are whole
  conversations that differ only in the last (assistant) turn (TRL's formats). Message lists
  may be JSON strings (CSV).

Every row becomes an :class:`Example`: ``messages`` (system prompt + turns, without the final
answer) and ``target`` (the final answer), so a bench can prompt any runtime with its own
chat template.

Splits (:func:`load_splits`) are disjoint: **train** (the optimizer, and GPTQ calibration),
**validation** (early stopping, the best checkpoint, the parity gate's prompts) and **test** (only
``ftedge bench``). Each comes from its own file (``data.val``, ``data.test``) or is held out of
``data.train`` with a fixed seed: one shuffle, test rows first, then validation rows. Identical
rows (same prompt and answer) always land in the same split, and a row of a separate test file
is left out of training and validation, so the bench never scores a row any stage has seen.

:func:`encode` applies the base tokenizer's chat template and marks which
tokens carry loss: only assistant tokens, their end-of-turn token included (so exported
models stop). Over-long rows are truncated, counted and reported in one warning: the end of
the user text goes first (the system prompt, the template's assistant header and the answer
stay), then the end of the row.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftedge.errors import FtedgeError, from_os_error
from ftedge.families import end_of_turn_token
from ftedge.formats.chat_template import fit_messages, trained_chat_template
from ftedge.recipe import DataConfig, Recipe

log = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")
HF_SUFFIXES = (".parquet", ".arrow")
# Files `datasets.save_to_disk` writes: a folder without one of them holds no dataset.
HF_FOLDER_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


@dataclass(frozen=True)
class Example:
    """One chat example: the prompt turns and the final answer (what bench compares with)."""

    messages: list[dict[str, str]]
    target: str
    source: str = ""  # "file:row", for messages
    raw: bool = False  # completion rows without a prompt: plain text, no chat template
    rejected: str | None = None  # preference rows: the dispreferred answer (``target`` is the chosen one)

    def conversation(self) -> list[dict[str, str]]:
        return [*self.messages, {"role": "assistant", "content": self.target}]


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    labels: list[str] = field(default_factory=list)  # text_label: the label set (sorted)
    test: list[Example] = field(default_factory=list)
    left_out: list[Example] = field(default_factory=list)  # training rows also given as validation/test rows: not trained on


@dataclass
class Encoded:
    """A tokenized example: ``labels[i]`` is the token at ``i`` if trained there, else -100."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodedPair:
    """A tokenized preference example: the prompt with the chosen answer, and with the rejected one."""

    chosen: Encoded
    rejected: Encoded


# --------------------------------------------------------------------------- reading rows
def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a data file as ``(where, row)``; ``where`` is ``file:row`` for error messages."""
    path = Path(path)
    if not path.exists():
        raise FtedgeError(
            f"data file {path} not found", hint="fix data.train / data.val in the recipe (relative paths start at the recipe's folder)"
        )
    if path.is_dir() and not any((path / marker).is_file() for marker in HF_FOLDER_MARKERS):
        what = "an empty folder" if not any(path.iterdir()) else "a folder without a Hugging Face dataset in it"
        raise FtedgeError(
            f"data file {path} is {what}",
            hint="point data.train / data.val at a .csv or .jsonl file, a .parquet/.arrow file, or a folder made by `save_to_disk`",
        )
    try:
        if path.is_dir() or path.suffix in HF_SUFFIXES:
            return _read_hf(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _read_csv(path)
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
    except OSError as err:
        raise from_os_error(err, path, action="read", hint="make the data file readable, or copy it somewhere you can read") from None
    raise FtedgeError(
        f"data file {path}: unsupported file type {path.suffix!r}", hint="use .csv, .jsonl/.json, .parquet/.arrow, or a HF-datasets folder"
    )


def _read_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            # Data row i sits on line i + 1 (the header is line 1) when no field spans lines.
            return [(f"{path}:row {i}", dict(row)) for i, row in enumerate(reader, start=1)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise FtedgeError(f"{path}: cannot read as UTF-8 CSV ({err})", hint="save the file as UTF-8 CSV with a header row") from None


def _read_json(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise FtedgeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})", hint="save the file as UTF-8 JSON/JSONL") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise FtedgeError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})", hint="fix the JSON syntax") from None
        rows = [(f"{path}:row {i}", item) for i, item in enumerate(items, start=1)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise FtedgeError(f"{path}:line {lineno}: not valid JSON ({err.msg})", hint="write one JSON object per line") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise FtedgeError(
                f"{where}: expected a JSON object, got {type(row).__name__}", hint="each row must be an object with the recipe's fields"
            )
    return rows


def _read_hf(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise FtedgeError(
            f"{path}: reading Hugging Face dataset files needs the `datasets` package",
            hint="pip install datasets, or export the data to .jsonl/.csv",
        ) from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise FtedgeError(
                        f"{path}: dataset dict without a 'train' split (has {list(ds)})", hint="point data.train at one split's folder"
                    )
                ds = ds["train"]
        else:
            kind = "parquet" if path.suffix == ".parquet" else "arrow"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except FtedgeError:
        raise
    except Exception as err:
        raise FtedgeError(
            f"{path}: cannot load as a Hugging Face dataset ({type(err).__name__}: {err})",
            hint="give a save_to_disk folder, a .parquet or an .arrow file",
        ) from None
    return [(f"{path}:row {i}", dict(row)) for i, row in enumerate(ds, start=1)]


# --------------------------------------------------------------------------- rows -> examples
def _field(row: dict[str, Any], name: str, where: str, fmt: str, *, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        have = ", ".join(sorted(map(str, row))) or "none"
        raise FtedgeError(
            f"{where}: row has no {name!r} (format {fmt}; fields: {have})",
            hint=f"fill the field or set the recipe's data field mapping (e.g. data.{_mapping_key(fmt, name)})",
        )
    return value if isinstance(value, str) else str(value)


def _mapping_key(fmt: str, name: str) -> str:
    return {
        "text_label": "label_field / data.text_field",
        "completion": "prompt_field / data.completion_field",
        "messages": "messages_field",
    }.get(fmt, "format")


def _with_system(system: str | None, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    if system and not (turns and turns[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *turns]
    return turns


def row_to_example(row: dict[str, Any], where: str, cfg: DataConfig) -> Example:
    """One row in the recipe's format, as an Example (raises FtedgeError naming the row)."""
    fmt = cfg.format
    system = cfg.system_prompt
    if fmt == "text_label":
        text = _field(row, cfg.text_field, where, fmt)
        label = _field(row, cfg.label_field, where, fmt)
        assert text is not None and label is not None
        return Example(_with_system(system, [{"role": "user", "content": text}]), label.strip(), where)
    if fmt == "alpaca":
        instruction = _field(row, "instruction", where, fmt)
        extra = _field(row, "input", where, fmt, required=False)
        output = _field(row, "output", where, fmt)
        assert output is not None
        user = f"{instruction}\n\n{extra}" if extra else str(instruction)
        return Example(_with_system(system, [{"role": "user", "content": user}]), output, where)
    if fmt == "completion":
        if cfg.prompt_field in row:
            prompt = _field(row, cfg.prompt_field, where, fmt)
            completion = _field(row, cfg.completion_field, where, fmt)
            assert prompt is not None and completion is not None
            return Example(_with_system(system, [{"role": "user", "content": prompt}]), completion, where)
        text = _field(row, cfg.text_field, where, fmt)
        assert text is not None
        return Example([], text, where, raw=True)
    if fmt == "messages":
        return _messages_example(row, where, cfg)
    if fmt == "preference":
        return _preference_example(row, where, cfg)
    raise FtedgeError(f"unknown data format {fmt!r}", hint="use messages, alpaca, completion, text_label or preference")


def _turns(value: Any, where: str, name: str) -> list[dict[str, str]]:
    """A non-empty list of {role, content} messages (a JSON string of one in CSV), checked."""
    turns = value
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise FtedgeError(
                f"{where}: {name!r} is not a JSON list of messages", hint='write [{"role": "user", "content": "..."}, ...]'
            ) from None
    if not isinstance(turns, list) or not turns:
        raise FtedgeError(
            f"{where}: {name!r} must be a non-empty list of messages",
            hint='write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    clean: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise FtedgeError(
                f"{where}: message {i} is not a {{role, content}} object with role in {list(ROLES)}", hint="fix the message list"
            )
        clean.append({"role": turn["role"], "content": turn["content"]})
    return clean


def _ends_with_answer(turns: list[dict[str, str]], where: str) -> None:
    if turns[-1]["role"] != "assistant":
        raise FtedgeError(
            f"{where}: the last message must be the assistant's answer (got {turns[-1]['role']!r})",
            hint="end each conversation with an assistant turn",
        )


def _messages_example(row: dict[str, Any], where: str, cfg: DataConfig) -> Example:
    if row.get(cfg.messages_field) is None:
        _field(row, cfg.messages_field, where, "messages")
    clean = _turns(row.get(cfg.messages_field), where, cfg.messages_field)
    _ends_with_answer(clean, where)
    return Example(_with_system(cfg.system_prompt, clean[:-1]), clean[-1]["content"], where)


def _as_messages(value: Any) -> Any:
    """A JSON message list stored as a string (CSV) as the list; anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed):
            return parsed
    return value


def _preference_example(row: dict[str, Any], where: str, cfg: DataConfig) -> Example:
    """prompt + chosen + rejected (strings, or TRL's message lists), or chosen/rejected whole conversations."""
    fmt = "preference"
    for name in (cfg.chosen_field, cfg.rejected_field):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            _field(row, name, where, fmt)
    chosen, rejected = _as_messages(row[cfg.chosen_field]), _as_messages(row[cfg.rejected_field])
    prompt = _as_messages(row.get(cfg.prompt_field))
    if prompt is None:  # implicit prompt: two conversations sharing every turn but the last
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise FtedgeError(
                f"{where}: row has no {cfg.prompt_field!r}, and {cfg.chosen_field!r}/{cfg.rejected_field!r} are not conversations",
                hint="give a prompt column, or chosen/rejected as message lists that end with the assistant's answer",
            )
        good, bad = _turns(chosen, where, cfg.chosen_field), _turns(rejected, where, cfg.rejected_field)
        _ends_with_answer(good, where)
        _ends_with_answer(bad, where)
        if good[:-1] != bad[:-1]:
            raise FtedgeError(
                f"{where}: the chosen and rejected conversations differ before their last turn",
                hint="they must share the prompt turns and differ only in the assistant's final answer",
            )
        messages = good[:-1]
        chosen_text, rejected_text = good[-1]["content"], bad[-1]["content"]
    else:
        if isinstance(prompt, list):
            messages = _turns(prompt, where, cfg.prompt_field)
            if messages[-1]["role"] == "assistant":
                raise FtedgeError(f"{where}: {cfg.prompt_field!r} ends with an assistant turn", hint="the prompt ends with the user's turn")
        else:
            text = _field(row, cfg.prompt_field, where, fmt)
            messages = [{"role": "user", "content": str(text)}]
        chosen_text = _answer_text(chosen, where, cfg.chosen_field)
        rejected_text = _answer_text(rejected, where, cfg.rejected_field)
    for name, text in ((cfg.chosen_field, chosen_text), (cfg.rejected_field, rejected_text)):
        if not text.strip():
            raise FtedgeError(f"{where}: {name!r} is an empty answer", hint="fill the answer or drop the row")
    return Example(_with_system(cfg.system_prompt, messages), chosen_text, where, rejected=rejected_text)


def _answer_text(value: Any, where: str, name: str) -> str:
    """An answer: a string, or a list holding one assistant message (TRL's conversational format)."""
    if isinstance(value, list):
        turns = _turns(value, where, name)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise FtedgeError(f"{where}: {name!r} must be one assistant message", hint='write [{"role": "assistant", "content": "..."}]')
        return turns[0]["content"]
    return str(value)


def examples_from_file(path: Path, cfg: DataConfig) -> list[Example]:
    return [row_to_example(row, where, cfg) for where, row in read_rows(path)]


# --------------------------------------------------------------------------- splits
def content_key(example: Example) -> str:
    """What makes two examples the same row: prompt turns, answer and kind (not where they were read)."""
    return json.dumps([example.messages, example.target, example.raw], ensure_ascii=False, sort_keys=True)


def normalize(text: str) -> str:
    """Case- and spacing-insensitive form of a text (what "the same input" means)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_text(example: Example) -> str:
    """The input of an example: its non-system turns (the system prompt is the same on every row)."""
    return "\n".join(m["content"] for m in example.messages if m["role"] != "system")


def input_key(example: Example) -> str:
    """What makes two rows the same input, whatever their answers: the normalized prompt turns (raw text rows: the text)."""
    return normalize(prompt_text(example) if not example.raw else example.target)


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


def _file_split(path: Path, cfg: DataConfig, what: str, key: str) -> list[Example]:
    rows = examples_from_file(path, cfg)
    if not rows:
        raise FtedgeError(f"{what} file {path} has no rows", hint=f"add rows or drop data.{key} to hold out a fraction of data.train")
    return rows


def _split(examples: list[Example], cfg: DataConfig, source: Path) -> tuple[list[Example], list[Example], list[Example], list[Example]]:
    """(train, val, test, left_out): separate files where given, else fixed-seed held-out groups of ``examples`` (test
    first); ``left_out``: training rows that are also validation or test rows, kept out of training."""
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
    if cfg.test is not None:
        test = _file_split(cfg.test, cfg, "test", "test")
    if cfg.val is not None:
        val = _file_split(cfg.val, cfg, "validation", "val")
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


def load_splits(recipe: Recipe) -> Splits:
    """Disjoint train / validation / test examples: held out of ``data.train`` with a fixed seed, or from ``data.val`` / ``data.test``."""
    cfg = recipe.data
    examples = examples_from_file(cfg.train, cfg)
    if not examples:
        raise FtedgeError(f"data file {cfg.train} has no rows", hint="check the file (a CSV needs a header row and data rows)")
    train, val, test, left_out = _split(examples, cfg, cfg.train)
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    labels: list[str] = []
    if cfg.format == "text_label":
        labels = sorted({e.target for e in examples} | {e.target for e in val} | {e.target for e in test})
        if len(labels) < 2:
            raise FtedgeError(
                f"{cfg.train}: label field {cfg.label_field!r} has a single class ({labels[0]!r})",
                hint="a classifier needs at least two labels; check data.label_field",
            )
    return Splits(train=train, val=val, labels=labels, test=test, left_out=left_out)


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


def training_examples(recipe: Recipe, n: int) -> list[Example]:
    """The first ``n`` training rows of the fixed split (what GPTQ calibrates on: never a validation or test row)."""
    return load_splits(recipe).train[:n]


def bench_examples(recipe: Recipe) -> list[Example]:
    """The test split: the rows only the bench scores."""
    return load_splits(recipe).test


# --------------------------------------------------------------------------- held-out prompts
FALLBACK_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "My card has not arrived yet. What should I do?",
    "Translate 'good morning' into Spanish.",
    "List three primary colors.",
    "How many days are in a leap year?",
    "Give me a short tip for sleeping better.",
    "What does a CPU do?",
)


@dataclass
class Prompt:
    """One chat prompt and, optionally, the answer the model was tuned to give."""

    messages: list[dict[str, str]]
    target: str | None = None

    def text(self, tokenizer: Any, *, eot: str | None = None) -> str:
        """The prompt rendered with the HF chat template, followed by its answer (and ``eot``) when known."""
        text = tokenizer.apply_chat_template(
            fit_messages(self.messages, tokenizer.chat_template), tokenize=False, add_generation_prompt=True
        )
        if self.target:
            text += self.target + (eot or "")
        return text


def gate_prompts(recipe: Recipe, n: int = 16) -> list[Prompt]:
    """Validation prompts of the recipe's data (validation rows with their answers), or fixed chat prompts when there are none."""
    val = load_splits(recipe).val
    prompts = [Prompt([dict(m) for m in ex.messages], ex.target) for ex in val[:n]]
    if prompts:
        return prompts
    log.warning("no validation rows; the parity gate uses fixed chat prompts")
    system = recipe.data.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    return [Prompt([*head, {"role": "user", "content": text}]) for text in FALLBACK_PROMPTS[:n]]


# --------------------------------------------------------------------------- tokenization
class _NotIncremental(Exception):
    """The template renders a conversation differently from its prefix (Qwen3, Phi-4-mini)."""


class ChatEncoder:
    """Applies a tokenizer's chat template and masks everything but the assistant's tokens.

    The template is the trained one (``ftedge.formats.chat_template.trained_chat_template``: Qwen3's thinking off) and
    a system prompt is folded into the first user turn where the template has no system role
    (``ftedge.formats.chat_template.fit_messages``, Gemma 2).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        template = getattr(tokenizer, "chat_template", None)
        self.template = trained_chat_template(template) if isinstance(template, str) else template
        self.eot = end_of_turn_token(tokenizer)
        self.truncated = 0
        self.dropped = 0
        self._tail = self._prompt_tail_tokens()

    def _prompt_tail_tokens(self) -> int:
        """Tokens after the last user message's text in a generation prompt (kept when truncating)."""
        text = self._render([{"role": "user", "content": "\x00END\x00"}], generation=True)
        return len(self._ids(text.split("\x00END\x00", 1)[-1]))

    def _render(self, messages: Sequence[dict[str, str]], *, generation: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                fit_messages(messages, self.template), chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        except TemplateError as err:
            raise FtedgeError(
                f"the base model's chat template refuses a training conversation ({err})",
                hint="check the roles of the data's messages (many templates need user/assistant turns to alternate)",
            ) from None

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a generation prompt (what inference feeds the model)."""
        return self._ids(self._render(messages, generation=True))

    def pieces(self, example: Example) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trained)`` pieces.

        Each assistant turn is found as the text between the generation prompt before it and the
        conversation up to it, when the template renders every conversation as a prefix of its
        continuation (ChatML, Llama 3, Gemma); otherwise (Qwen3 drops earlier think blocks,
        Phi-4-mini ends a finished conversation with eos) each answer is located in order in the
        rendered whole conversation.
        """
        if example.raw:
            eos = getattr(self.tok, "eos_token", None) or ""
            return [(example.target + eos, True)]
        conv = example.conversation()
        try:
            return self._incremental_pieces(conv)
        except _NotIncremental:
            return self._located_pieces(conv)

    def _trained_part(self, answer: str, content: str) -> tuple[str, str]:
        """``answer`` split after its end-of-turn token (the part trained, the rest)."""
        cut = answer.find(self.eot, len(content.rstrip()) // 2) if self.eot else -1
        if cut >= 0:
            return answer[: cut + len(self.eot or "")], answer[cut + len(self.eot or "") :]
        return answer + (getattr(self.tok, "eos_token", None) or ""), ""

    def _incremental_pieces(self, conv: list[dict[str, str]]) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        done = ""
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            before = self._render(conv[:i], generation=True)
            full = self._render(conv[: i + 1])
            if not before.startswith(done) or not full.startswith(before):
                raise _NotIncremental
            trained, rest = self._trained_part(full[len(before) :], msg["content"])
            out += [(before[len(done) :], False), (trained, True)]
            if i < len(conv) - 1:
                out.append((rest, False))
            done = full
        return [(t, flag) for t, flag in out if t]

    def _located_pieces(self, conv: list[dict[str, str]]) -> list[tuple[str, bool]]:
        text = self._render(conv)
        out: list[tuple[str, bool]] = []
        cursor = emitted = 0
        for msg in fit_messages(conv, self.template):
            content = str(msg["content"]).strip()
            at = text.find(content + (self.eot or ""), cursor) if msg["role"] == "assistant" and self.eot else -1
            if at < 0:
                at = text.find(content, cursor)
            if at < 0:
                raise FtedgeError(
                    "the base model's chat template does not render a message's text as given, so assistant tokens cannot be located",
                    hint="use a base model with a standard chat template (e.g. ChatML or Llama-3), or set the recipe's chat_template",
                )
            cursor = at + len(content)
            if msg["role"] == "assistant":
                end = text.find(self.eot, cursor) if self.eot else -1
                if end >= 0 and not text[cursor:end].strip():  # the end-of-turn token right after the answer
                    cursor = end + len(self.eot or "")
                out += [(text[emitted:at], False), (text[at:cursor], True)]
                emitted = cursor
        return [(t, flag) for t, flag in out if t]

    def encode(self, example: Example) -> Encoded | None:
        """Token ids and labels, truncated to ``max_length``; None if no trained token would remain."""
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.pieces(example):
            piece = self._ids(text)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = self._truncate(ids, labels)
        if not any(x != IGNORE for x in labels[1:]):
            self.dropped += 1
            return None
        labels[0] = IGNORE  # nothing predicts an example's first token (and in a packed row it must not)
        return Encoded(ids, labels)

    def n_tokens(self, examples: Sequence[Example]) -> list[int]:
        """Tokens of each rendered example before any truncation (a preference row: its longer answer), as ``encode`` counts them."""
        variants = [[e] if e.rejected is None else [e, replace(e, target=e.rejected)] for e in examples]
        pieces = [[[text for text, _ in self.pieces(x)] for x in v] for v in variants]
        texts = [text for v in pieces for x in v for text in x]
        lengths = iter(len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        return [max(sum(next(lengths) for _ in x) for x in v) for v in pieces]

    def encode_pair(self, example: Example) -> EncodedPair | None:
        """A preference example as two encoded rows (chosen, rejected); None if either has no trained token left."""
        if example.rejected is None:
            raise FtedgeError(f"{example.source}: not a preference row (no rejected answer)", hint="set data.format: preference")
        chosen = self.encode(example)
        rejected = self.encode(replace(example, target=example.rejected))
        return None if chosen is None or rejected is None else EncodedPair(chosen, rejected)

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Drop the end of the text before the first answer (keeping the template's tail), then the row's end."""
        over = len(ids) - self.max_length
        first = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
        cut_end = max(0, first - self._tail)
        cut_start = max(0, cut_end - over)
        ids, labels = ids[:cut_start] + ids[cut_end:], labels[:cut_start] + labels[cut_end:]
        return ids[: self.max_length], labels[: self.max_length]

    def encode_all(self, examples: Iterable[Example], *, what: str = "train", pairs: bool = False) -> list[Any]:
        """Encoded rows (``pairs``: EncodedPair of preference rows); truncations reported in one warning."""
        before_t, before_d = self.truncated, self.dropped
        out = [e for e in map(self.encode_pair if pairs else self.encode, examples) if e is not None]
        trunc, drop = self.truncated - before_t, self.dropped - before_d
        if trunc:
            log.warning(
                "%s: %d row%s longer than max_length=%d tokens were truncated%s",
                what,
                trunc,
                "s" if trunc > 1 else "",
                self.max_length,
                f" ({drop} dropped: no answer token left)" if drop else "",
            )
        if not out and (trunc or drop):
            raise FtedgeError(
                f"{what}: no row fits max_length={self.max_length} tokens with its answer",
                hint="raise train.max_length or shorten the system prompt",
            )
        return out


def check_fits(encoder: ChatEncoder, examples: Sequence[Example]) -> None:
    """A max_length below the fixed prompt (system + template) cannot hold any answer: say so."""
    chat = next((e for e in examples if not e.raw), None)
    if chat is None:
        return
    fixed = len(encoder.prompt_ids([*(m if m["role"] == "system" else {**m, "content": ""} for m in chat.messages)]))
    if fixed + 1 >= encoder.max_length:
        raise FtedgeError(
            f"train.max_length={encoder.max_length} is smaller than the prompt ({fixed} tokens of system prompt and chat template)",
            hint="raise train.max_length or shorten data.system_prompt",
        )


def tokenized_splits(recipe: Recipe, tokenizer: Any, splits: Splits | None = None) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenized, masked training and validation rows for a recipe (the training stage's input).

    Preference data (``data.format: preference``) gives :class:`EncodedPair` rows instead.
    """
    splits = splits or load_splits(recipe)
    enc = ChatEncoder(tokenizer, recipe.train.max_length)
    check_fits(enc, splits.train)
    pairs = recipe.data.format == "preference"
    return enc.encode_all(splits.train, what="train", pairs=pairs), enc.encode_all(splits.val, what="val", pairs=pairs)


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
