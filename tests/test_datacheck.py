"""`ftedge data check`: duplicates, near-duplicates, leakage, label balance, empty answers, over-long rows and
mixed encodings, as a table, as JSON, failing on leakage with --strict; also warned about when training starts."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ftedge.cli import main

REPO = Path(__file__).resolve().parents[1]

TRAIN = [
    ("where is my new card", "card_arrival"),
    ("where is my new card", "card_arrival"),  # exact duplicate
    ("Where is my  NEW card", "lost_or_stolen_card"),  # same input (case, spacing), another answer: conflict
    ("my card has not arrived yet after two weeks", "card_arrival"),
    ("my card has not arrived yet after two week", "card_arrival"),  # near duplicate
    ("i lost my card in the park", "lost_or_stolen_card"),
    ("someone stole my card on the bus", "lost_or_stolen_card"),
    ("my card was stolen yesterday", "lost_or_stolen_card"),
    ("what is the exchange rate for euros", "exchange_rate"),
    ("how much is a dollar in pounds today", "exchange_rate"),
    ("rate for yen please", "exchange_rate"),
    ("the caf\u00c3\u00a9 charged me twice", "exchange_rate"),  # mojibake: UTF-8 read as Latin-1
    ("why was my top up declined " + "really " * 60, "top_up_failed"),  # over-long
    ("top up failed again", "top_up_failed"),
    ("my top-up did not go through", "top_up_failed"),
    ("refund please", "refund_not_showing"),  # rare: once
]
VAL = [
    ("i lost my card in the park", "lost_or_stolen_card"),  # leaked
    ("what is the exchange rate for euro", "exchange_rate"),  # nearly leaked
    ("can i get cash back", "cash_withdrawal"),  # never seen in training
]


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        w.writerows(rows)
    return path


def _recipe(tmp_path: Path, tiny_model_dir: Path, **data) -> Path:
    raw = {
        "name": "check",
        "base_model": str(tiny_model_dir),
        "data": {
            "train": "train.csv",
            "val": "val.csv",
            "test_fraction": 0.0,
            "format": "text_label",
            "label_field": "category",
            "system_prompt": "Label it.",
        }
        | data,
        "adapter": {"r": 4},
        "quant": {"bits": 32},
        "train": {"method": "lora", "max_length": 48, "max_steps": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def messy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    _csv(tmp_path / "train.csv", TRAIN)
    _csv(tmp_path / "val.csv", VAL)
    return _recipe(tmp_path, tiny_model_dir)


def test_data_check_finds_each_problem(messy: Path) -> None:
    res = CliRunner().invoke(main, ["data", "check", str(messy), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["rows"] == {"train": len(TRAIN), "val": len(VAL)}
    found = {f["check"]: f for f in report["findings"]}
    dup = found["duplicates"]
    assert dup["status"] == "warning" and dup["details"]["exact"] == 1 and dup["details"]["conflicting_inputs"] == 1
    near = found["near_duplicates"]
    assert near["details"]["pairs"] >= 1 and any("after two week" in e for e in near["details"]["examples"])
    leak = found["leakage"]
    assert (leak["details"]["exact"], leak["details"]["near"]) == (1, 1) and "val.csv:row 1" in leak["details"]["examples"][0]
    labels = found["labels"]["details"]
    assert labels["counts"]["lost_or_stolen_card"] == 4 and labels["counts"]["refund_not_showing"] == 1
    assert list(labels["rare"]) == ["refund_not_showing"] and labels["unseen"] == ["cash_withdrawal"]
    assert found["too_long"]["details"]["over"] == 1 and found["too_long"]["details"]["longest"] > 48
    assert found["encoding"]["details"]["mojibake"] == 1
    assert found["empty_answers"]["status"] == "ok"


def test_strict_fails_on_leakage_and_the_table_reads(messy: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    cli = CliRunner()
    res = cli.invoke(main, ["data", "check", str(messy), "--strict", "--no-tokens"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "leakage" in res.output and "also in training" in res.output.splitlines()[-1]
    assert "near_duplicates" in res.output and "│" in res.output  # the rich table came first
    _csv(tmp_path / "val.csv", VAL[1:])  # no exact leak left
    assert cli.invoke(main, ["data", "check", str(messy), "--strict", "--no-tokens"]).exit_code == 0


def test_unreadable_and_empty_rows_are_all_listed(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "train.csv").write_text("text,category\nhello,a\nhi,\nyo,b\nsup,  \n")
    _csv(tmp_path / "val.csv", [("hey", "a")])
    res = CliRunner().invoke(main, ["data", "check", str(_recipe(tmp_path, tiny_model_dir)), "--json", "--no-tokens"])
    assert res.exit_code == 2
    report = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    (finding,) = report["findings"]
    assert finding["check"] == "unreadable" and finding["details"]["count"] == 2
    assert "row 2" in finding["details"]["examples"][0] and "row 4" in finding["details"]["examples"][1]
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]},
        {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "fine"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    recipe = _recipe(tmp_path, tiny_model_dir, train="chat.jsonl", val=None, format="messages")
    res = CliRunner().invoke(main, ["data", "check", str(recipe), "--json", "--no-tokens"])
    found = {f["check"]: f for f in json.loads(res.stdout)["findings"]}
    assert found["empty_answers"]["details"]["count"] >= 1 and "labels" not in found


def test_train_starts_with_the_checks_as_warnings(messy: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """`ftedge train` (commands.train) hands the data checks to the train stage, which logs them before the model loads."""
    from ftedge import commands
    from ftedge.train import model as train_model

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train_model, "load_model", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        commands.train(messy, [], run_dir=tmp_path / "run")
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data check:")]
    assert any(w.startswith("data check: leakage: 1 held-out row") for w in warned)
    assert any("duplicates" in w for w in warned) and any("rare label" in w for w in warned)


def test_banking77_duplicates_and_balance() -> None:
    """The shipped BANKING77 data: 4 repeated training rows, no held-out input in training (the split keeps each input in
    one split), 77 labels."""
    from ftedge.datacheck import check_data
    from ftedge.recipe import load_recipe

    report = check_data(load_recipe(REPO / "recipes" / "smollm2-banking77.yaml"))
    found = {f.check: f for f in report.findings}
    assert found["duplicates"].details["exact"] == 4 and found["duplicates"].details["conflicting_inputs"] == 0
    assert found["leakage"].details["exact"] == 0 and found["leakage"].details["near"] > 0
    labels = found["labels"].details
    assert labels["labels"] == 77 and sum(labels["counts"].values()) == report.rows["train"] == 8003
    assert labels["min"] < labels["median"] < labels["max"] and not labels["unseen"]
