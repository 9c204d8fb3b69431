"""Reading training data: file readers and row formats, each row as a chat :class:`Example`.

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
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftedge.errors import FtedgeError, from_os_error
from ftedge.recipe import DataConfig

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
