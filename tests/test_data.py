"""Data loading, formats, chat-template masking, truncation, splits, packing and bad input."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml
from helpers import write_text_label_csv

from ftedge.data.encoding import IGNORE, ChatEncoder, Encoded, tokenized_splits
from ftedge.data.reading import Example
from ftedge.data.splits import check_dataset, content_key, load_splits
from ftedge.errors import FtedgeError
from ftedge.loader import load_tokenizer
from ftedge.recipe import load_recipe
from ftedge.train.batch import make_batch


def _recipe(tmp_path: Path, model_dir: Path, data: dict, **train) -> Path:
    raw = {
        "name": "t",
        "base_model": str(model_dir),
        "data": {"test_fraction": 0.0, **data},  # tests of formats and masking hold out no test rows
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 2, "max_length": 64, **train},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def _trained_text(tok, enc: Encoded) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE])


def test_text_label_csv_masks_all_but_answer_and_end_of_turn(tmp_path, tiny_model_dir, tok):
    write_text_label_csv(tmp_path / "d.csv", 20)
    recipe = load_recipe(
        _recipe(
            tmp_path,
            tiny_model_dir,
            {"train": "d.csv", "text_field": "text", "label_field": "category", "system_prompt": "Label it.", "val_fraction": 0.2},
        )
    )
    splits = load_splits(recipe)
    assert (len(splits.train), len(splits.val)) == (16, 4)
    ex = splits.train[0]
    assert ex.messages == [{"role": "system", "content": "Label it."}, {"role": "user", "content": ex.messages[1]["content"]}]
    assert ex.target in {"card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"}
    train, val = tokenized_splits(recipe, tok, splits)
    enc = train[0]
    assert _trained_text(tok, enc) == f"{ex.target}<|im_end|>"
    # the prompt part is exactly what inference feeds the model
    n_prompt = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
    assert enc.input_ids[:n_prompt] == ChatEncoder(tok, 64).prompt_ids(ex.messages)
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nLabel it.<|im_end|>")
    # fixed seed: the same split every time
    assert [e.target for e in load_splits(recipe).val] == [e.target for e in splits.val]


def test_alpaca_jsonl(tmp_path, tiny_model_dir, tok):
    _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"}] * 3)
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "a.jsonl", "format": "alpaca", "val_fraction": 0.0}))
    splits = load_splits(recipe)
    users = {e.messages[-1]["content"] for e in splits.train}
    assert users == {"Add\n\n2 and 3", "Say hi"}
    train, _ = tokenized_splits(recipe, tok, splits)
    assert {_trained_text(tok, e) for e in train} == {"5<|im_end|>", "hi<|im_end|>"}


def test_completion_prompt_and_raw_text(tmp_path, tiny_model_dir, tok):
    _jsonl(tmp_path / "c.jsonl", [{"prompt": f"Capital of France? ({i})", "completion": "Paris"} for i in range(4)])
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "c.jsonl", "format": "completion", "val_fraction": 0.25}))
    train, val = tokenized_splits(recipe, tok)
    assert _trained_text(tok, train[0]) == "Paris<|im_end|>" and len(val) == 1
    (tmp_path / "r.json").write_text(json.dumps([{"text": f"the quick brown fox {w}"} for w in ("jumps", "runs", "sits", "naps")]))
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "r.json", "format": "completion", "val_fraction": 0.25}))
    splits = load_splits(recipe)
    assert splits.train[0].raw and splits.train[0].messages == []
    train, _ = tokenized_splits(recipe, tok, splits)
    # raw text: every token but the first is trained (nothing predicts the first), eos appended
    assert tok.decode(train[0].input_ids) == splits.train[0].target + tok.eos_token
    assert train[0].labels[0] == IGNORE and all(t != IGNORE for t in train[0].labels[1:])


def test_messages_multi_turn_trains_every_assistant_turn(tmp_path, tiny_model_dir, tok):
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "goodbye"},
    ]
    _jsonl(tmp_path / "m.jsonl", [{"messages": conv}] * 3)
    with open(tmp_path / "m.csv", "w", newline="") as fh:  # a CSV holds the list as a JSON string
        w = csv.writer(fh)
        w.writerow(["messages"])
        w.writerows([[json.dumps(conv)]] * 3)
    for name in ("m.jsonl", "m.csv"):
        recipe = load_recipe(
            _recipe(tmp_path, tiny_model_dir, {"train": name, "format": "messages", "system_prompt": "Be brief.", "val_fraction": 0.0})
        )
        splits = load_splits(recipe)
        ex = splits.train[0]
        assert ex.target == "goodbye" and ex.messages[0] == {"role": "system", "content": "Be brief."} and len(ex.messages) == 4
        train, _ = tokenized_splits(recipe, tok, splits)
        assert _trained_text(tok, train[0]) == "hello<|im_end|>goodbye<|im_end|>"


def test_hf_dataset_folder(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]).save_to_disk(str(tmp_path / "hf"))
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "hf", "val_fraction": 0.2}))
    splits = load_splits(recipe)
    assert len(splits.train) == 8 and splits.labels == ["a", "b"]


def test_separate_val_file_and_max_examples(tmp_path, tiny_model_dir):
    write_text_label_csv(tmp_path / "tr.csv", 20)
    write_text_label_csv(tmp_path / "va.csv", 6, seed=1)
    recipe = load_recipe(
        _recipe(tmp_path, tiny_model_dir, {"train": "tr.csv", "val": "va.csv", "label_field": "category", "max_examples": 7})
    )
    splits = load_splits(recipe)
    assert (len(splits.train), len(splits.val)) == (7, 6)
    assert "7 train rows" in check_dataset(recipe)


def test_truncation_is_counted_and_keeps_answer(tmp_path, tiny_model_dir, tok, caplog):
    rows = [{"text": "word " * 100, "label": "a"}, {"text": "short", "label": "b"}, {"text": "word " * 80, "label": "b"}]
    _jsonl(tmp_path / "l.jsonl", rows)
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "l.jsonl", "system_prompt": "S.", "val_fraction": 0.0}, max_length=40))
    with caplog.at_level(logging.WARNING, logger="ftedge.data"):
        train, _ = tokenized_splits(recipe, tok)
    assert "2 rows longer than max_length=40 tokens were truncated" in caplog.text
    for enc in train:
        assert len(enc.input_ids) <= 40
        text = tok.decode(enc.input_ids)
        assert text.startswith("<|im_start|>system\nS.<|im_end|>") and text.endswith("<|im_start|>assistant\n" + _trained_text(tok, enc))


def test_max_length_below_prompt_is_an_error(tmp_path, tiny_model_dir, tok):
    write_text_label_csv(tmp_path / "d.csv", 8)
    recipe = load_recipe(
        _recipe(tmp_path, tiny_model_dir, {"train": "d.csv", "label_field": "category", "system_prompt": "word " * 30}, max_length=20)
    )
    with pytest.raises(FtedgeError, match="max_length=20 is smaller than the prompt"):
        tokenized_splits(recipe, tok)


@pytest.mark.parametrize(
    ("content", "data", "match"),
    [
        (None, {"train": "missing.csv"}, "missing.csv not found"),
        ("text,category\n", {"train": "d.csv", "label_field": "category"}, "has no rows"),
        ("text,category\nhello,a\n,b\n", {"train": "d.csv", "label_field": "category"}, r"d.csv:row 2: row has no 'text'"),
        ("text,category\nhello,a\nhi,a\nyo,a\n", {"train": "d.csv", "label_field": "category", "val_fraction": 0.3}, "single class"),
        ("text,category\nhello,a\n", {"train": "d.csv", "label_field": "category", "format": "chatml"}, "data.format"),
        ("text,category\nhello,a\n", {"train": "d.txt", "label_field": "category"}, "unsupported file type"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, content, data, match):
    if content is not None:
        (tmp_path / data["train"]).write_text(content)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base_model": "/nonexistent/model", "data": data}))
    with pytest.raises(FtedgeError, match=match) as err:
        check_dataset(load_recipe(path, check_files=False))
    assert "\n" not in str(err.value)


def test_missing_field_in_jsonl_names_line(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"train": "a.jsonl", "format": "alpaca"}}))
    with pytest.raises(FtedgeError, match=r"a.jsonl:line 2: row has no 'output'"):
        check_dataset(load_recipe(path))


def test_packing_has_no_cross_example_attention(tiny_model_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    enc = ChatEncoder(tok, 64)
    sys_msg = {"role": "system", "content": "S."}
    rows = [
        enc.encode(Example([sys_msg, {"role": "user", "content": u}], a))
        for u, a in (("where is my card", "card_arrival"), ("rate?", "exchange_rate"), ("lost it", "lost"))
    ]
    budget = len(rows[0].input_ids) + len(rows[1].input_ids)
    batch = make_batch(rows, max_length=budget, packing=True)
    assert batch["input_ids"].shape == (2, budget)  # 3 examples packed into 2 rows, padding only at the end of the second
    assert batch["n_tokens"] == sum(len(r.input_ids) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        first, second = len(rows[0].input_ids), len(rows[1].input_ids)
        alone = model(input_ids=torch.tensor([rows[1].input_ids])).logits[0]
    torch.testing.assert_close(packed[0, first : first + second], alone, atol=1e-4, rtol=1e-4)
    unpacked = make_batch(rows, max_length=64, packing=False)
    assert unpacked["input_ids"].shape[0] == 3 and "attention_mask" in unpacked


# -- disjoint train / validation / test splits ---------------------------------------------------------------------------
def _keys(examples) -> set[str]:
    return {content_key(e) for e in examples}


def test_splits_are_disjoint_fixed_and_cover_every_row(tmp_path, tiny_model_dir):
    write_text_label_csv(tmp_path / "d.csv", 120)  # random templates: many rows are exact duplicates of others
    data = {"train": "d.csv", "label_field": "category", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 3}
    splits = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, data)))
    train, val, test = _keys(splits.train), _keys(splits.val), _keys(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)  # duplicates land in one split
    assert len(splits.train) + len(splits.val) + len(splits.test) == 120
    assert len(test) == round(len(train | val | test) * 0.2)
    again = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, data)))
    assert [e.source for e in again.test] == [e.source for e in splits.test]  # fixed seed
    # the test rows are held out first: another validation fraction keeps them
    other_val = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, {**data, "val_fraction": 0.1})))
    assert _keys(other_val.test) == test and len(other_val.val) < len(splits.val)
    other_seed = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, {**data, "seed": 4})))
    assert _keys(other_seed.test) != test
    summary = check_dataset(load_recipe(_recipe(tmp_path, tiny_model_dir, data)))
    assert f"{len(splits.train)} train rows, val {len(splits.val)} held out, test {len(splits.test)} held out (seed 3)" in summary


def test_separate_test_file_rows_never_train(tmp_path, tiny_model_dir, caplog):
    rows = [{"text": f"question {i}", "label": "ab"[i % 2]} for i in range(30)]
    _jsonl(tmp_path / "tr.jsonl", rows)
    _jsonl(tmp_path / "te.jsonl", rows[:3] + [{"text": "new question", "label": "a"}])
    data = {"train": "tr.jsonl", "test": "te.jsonl", "val_fraction": 0.2, "test_fraction": 0.5}
    with caplog.at_level(logging.WARNING, logger="ftedge.data"):
        splits = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, data)))
    assert [e.messages[-1]["content"] for e in splits.test] == ["question 0", "question 1", "question 2", "new question"]
    assert not (_keys(splits.train) | _keys(splits.val)) & _keys(splits.test)
    assert len(splits.train) + len(splits.val) == 27  # test_fraction is not used with data.test: nothing else held out
    assert "also test rows" in caplog.text
    with pytest.raises(FtedgeError, match="leaves no training rows"):
        load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "tr.jsonl", "val_fraction": 0.5, "test_fraction": 0.5}))


def test_bench_rows_share_nothing_with_validation_gate_or_calibration(tmp_path, tok):
    """The demo recipe on a small BANKING77 sample: the bench's test rows are no validation row, gate prompt or GPTQ text."""
    import csv

    from ftedge.bench.stage import run_examples
    from ftedge.data.prompts import gate_prompts
    from ftedge.data.splits import freeze_splits, run_splits
    from ftedge.export.stage import GATE_PROMPTS, calibration_texts
    from ftedge.manifest import Run

    root = Path(__file__).resolve().parent.parent
    with open(root / "data" / "banking77" / "train.csv", newline="") as src, open(tmp_path / "sample.csv", "w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        for i, row in enumerate(reader):
            if i <= 400:
                writer.writerow(row)
    recipe = load_recipe(root / "recipes" / "smollm2-banking77.yaml", [f"data.train={tmp_path / 'sample.csv'}"], check_files=True)
    run = Run.create(recipe, run_dir=tmp_path / "run")
    splits = freeze_splits(run)  # what the train stage does; merge, export and bench read them back through the run
    assert [e.source for e in run_splits(run).test] == [e.source for e in splits.test] == [e.source for e in load_splits(recipe).test]
    bench_rows, n_test = run_examples(run)
    assert n_test == len(splits.test) == 40 and len(bench_rows) == 40 and len(splits.val) == 40
    bench_keys = {content_key(Example(r["messages"], r["target"])) for r in bench_rows}
    assert bench_keys == _keys(splits.test)
    assert not bench_keys & _keys(splits.val) and not bench_keys & _keys(splits.train)
    gate = gate_prompts(run_splits(run), recipe, GATE_PROMPTS)
    assert [(p.messages, p.target) for p in gate] == [(e.messages, e.target) for e in splits.val[:GATE_PROMPTS]]
    texts = calibration_texts(run_splits(run), tok)
    assert len(texts) == 16 and all(t.endswith("<|im_end|>") for t in texts)
    held_out_users = {e.messages[-1]["content"] for e in splits.val + splits.test}
    assert not [u for u in held_out_users if any(f"user\n{u}<|im_end|>" in t for t in texts)]
    train_users = {e.messages[-1]["content"] for e in splits.train}
    assert all(any(f"user\n{u}<|im_end|>" in t for u in train_users) for t in texts)  # the check above can fail


def test_rows_differing_only_in_case_or_spacing_land_in_one_split(tmp_path, tiny_model_dir):
    from ftedge.data.splits import normalize, prompt_text

    rows = []
    for i in range(30):
        text, label = f"where is my card number {i}", "ab"[i % 2]
        rows += [{"text": text, "label": label}, {"text": "  " + text.upper().replace(" ", " \t ") + " ", "label": label}]
    _jsonl(tmp_path / "d.jsonl", rows)
    data = {"train": "d.jsonl", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 1}
    splits = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, data)))
    where: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for ex in getattr(splits, name):
            where.setdefault(normalize(prompt_text(ex)), set()).add(name)
    assert len(where) == 30 and all(len(names) == 1 for names in where.values()), where
    assert {name for names in where.values() for name in names} == {"train", "val", "test"}
    assert sum(len(getattr(splits, name)) for name in ("train", "val", "test")) == 60  # both spellings kept, as written
    # a separate test file: training rows that differ from a test row only in case or spacing are left out of training
    _jsonl(tmp_path / "te.jsonl", [{"text": "WHERE is my   card number 0", "label": "a"}])
    splits = load_splits(load_recipe(_recipe(tmp_path, tiny_model_dir, {**data, "test": "te.jsonl", "val_fraction": 0.0})))
    assert not [e for e in splits.train if normalize(prompt_text(e)) == "where is my card number 0"]
    assert [e.messages[-1]["content"] for e in splits.left_out] == [rows[0]["text"], rows[1]["text"]]


def test_frozen_splits_read_back_and_refuse_a_changed_data_file(tmp_path, tiny_model_dir):
    from ftedge.atomic import sha256_file
    from ftedge.data.splits import freeze_splits, run_splits
    from ftedge.manifest import Run

    rows = [{"text": f"question {i}", "label": "ab"[i % 2]} for i in range(30)]
    data = _jsonl(tmp_path / "tr.jsonl", rows)
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, {"train": "tr.jsonl", "val_fraction": 0.2, "test_fraction": 0.2}))
    run = Run.create(recipe, run_dir=tmp_path / "run")
    frozen = freeze_splits(run)
    doc = json.loads((run.path / "splits.json").read_text())
    assert doc["files"]["train"] == {"path": str(data.resolve()), "sha256": sha256_file(data), "rows": 30}
    assert run.artifact("splits").entry["test"] == len(frozen.test) > 0

    def rows_of(s):
        return {name: [(e.source, e.messages, e.target) for e in getattr(s, name)] for name in ("train", "val", "test", "left_out")}

    assert rows_of(run_splits(run)) == rows_of(frozen) == rows_of(load_splits(recipe))
    with open(data, "a") as fh:  # a row added: the frozen rows are all still there; the new one is in no split
        fh.write(json.dumps({"text": "brand new", "label": "a"}) + "\n")
    assert rows_of(run_splits(run)) == rows_of(frozen)
    assert len(load_splits(recipe).train) + len(load_splits(recipe).val) + len(load_splits(recipe).test) == 31

    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"text": "question 4", "label": "b"})  # one answer changed
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(FtedgeError) as err:
        run_splits(run)
    msg = str(err.value)
    assert "\n" not in msg and f"data file {data.resolve()} changed since run {run.path} was trained" in msg
    assert "1 of the 30 rows its splits hold changed or are gone (first: " in msg and "tr.jsonl:line 5)" in msg
    assert f"`ftedge train {run.path}/recipe.yaml`" in msg
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # the last row removed
    with pytest.raises(FtedgeError, match=r"1 of the 30 rows .* \(first: row 30 \(the file now has 29 rows\)\)"):
        run_splits(run)
    data.unlink()
    with pytest.raises(FtedgeError, match="tr.jsonl changed since run .*: the file is gone"):
        run_splits(run)
