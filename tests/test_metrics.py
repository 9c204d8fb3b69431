"""Bench figures computed from answers: classification metrics and intervals, chrF, the general set of the drift check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ftedge.bench import forgetting, generative, metrics
from ftedge.errors import FtedgeError


def test_classification_figures_by_hand() -> None:
    # gold a a a b b c; answers a a b b x c  ("x" is no label: a miss for b, not a class of its own)
    pairs = [("a", "a"), ("a", "a"), ("a", "b"), ("b", "b"), ("b", "x"), ("c", "c")]
    m = metrics.classification(pairs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = m["per_label"]["a"], m["per_label"]["b"], m["per_label"]["c"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3, abs=1e-4), 3)
    assert (b["precision"], b["recall"], b["support"]) == (0.5, 0.5, 2)
    assert (c["precision"], c["recall"], c["f1"]) == (1.0, 1.0, 1.0)
    assert set(m["per_label"]) == {"a", "b", "c"}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3, abs=1e-4)
    assert {(x["gold"], x["predicted"], x["count"]) for x in m["confusions"]} == {("a", "b", 1), ("b", "x", 1)}


def test_confusions_are_counted_and_ranked() -> None:
    pairs = [("a", "b")] * 3 + [("b", "a")] + [("c", "a")] * 2 + [("a", "a")] * 4
    assert [(x["gold"], x["predicted"], x["count"]) for x in metrics.classification(pairs)["confusions"]] == [
        ("a", "b", 3),
        ("c", "a", 2),
        ("b", "a", 1),
    ]


def test_accuracy_interval_is_reproducible_and_narrows_with_more_rows() -> None:
    rng = random.Random(0)
    small = [("y", "y" if rng.random() < 0.7 else "n") for _ in range(100)]
    large = [("y", "y" if rng.random() < 0.7 else "n") for _ in range(2000)]
    first, again = metrics.classification(small), metrics.classification(small)
    assert first["accuracy_ci"] == again["accuracy_ci"]  # fixed seed
    low, high = first["accuracy_ci"]
    assert low < first["accuracy"] < high
    # the percentile bootstrap of a proportion is close to the normal approximation 1.96 * sqrt(p(1-p)/n)
    p = first["accuracy"]
    assert (high - low) / 2 == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 100), rel=0.25)
    big_low, big_high = metrics.classification(large)["accuracy_ci"]
    assert big_high - big_low < (high - low) / 3
    perfect = metrics.classification([("a", "a"), ("b", "b"), ("a", "a")])
    assert perfect["accuracy_ci"] == [1.0, 1.0]
    assert metrics.classification([("a", "b")])["accuracy_ci"] is None  # one row: no interval


def test_perplexity_interval_resamples_examples() -> None:
    rng = np.random.default_rng(0)
    nll = [(float(rng.uniform(1, 3)) * t, int(t)) for t in rng.integers(2, 12, size=300)]
    ppl = float(np.exp(sum(n for n, _ in nll) / sum(t for _, t in nll)))
    low, high = metrics.perplexity_interval(nll)
    assert low < ppl < high and high - low < 0.2 * ppl
    assert metrics.perplexity_interval(nll[:1]) is None


def test_f1_movers_rank_the_largest_changes() -> None:
    ref = {k: {"f1": f, "support": 10} for k, f in {"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.7}.items()}
    other = {k: {"f1": f, "support": 10} for k, f in {"a": 0.9, "b": 0.5, "c": 0.6, "d": 0.2}.items()}
    moved = metrics.f1_movers(ref, other, k=2)
    assert [(m["label"], m["delta"]) for m in moved] == [("d", -0.5), ("b", -0.3)]
    assert metrics.f1_movers(ref, ref) == []


def test_chrf_scores_answers_against_references() -> None:
    same = generative.score([{"prompt": "p", "reference": "Open Settings and reset it.", "answer": "Open Settings and reset it."}] * 3)
    assert same["chrf"] == pytest.approx(100.0) and all(g["chrf"] == pytest.approx(100.0) for g in same["generations"])
    close = {"prompt": "q", "reference": "The link expires after 30 minutes.", "answer": "The link expires in 30 minutes."}
    far = {"prompt": "r", "reference": "The link expires after 30 minutes.", "answer": "Bananas are yellow."}
    scored = generative.score([close, far, close, far])
    by_answer = {g["answer"]: g["chrf"] for g in scored["generations"]}
    assert 50 < by_answer[close["answer"]] < 100 and by_answer[far["answer"]] < 20
    low, high = scored["chrf_ci"]
    assert 0 <= low < high <= 100
    assert generative.score([]) == {}


def test_the_shipped_general_set_and_its_licence() -> None:
    general = forgetting.load_general()
    assert len(general.prompts) == 40 and len(general.texts) == 6
    assert len({p["messages"][0]["content"] for p in general.prompts}) == 40
    assert all(p["messages"] == [{"role": "user", "content": p["messages"][0]["content"]}] for p in general.prompts)
    assert all(p["answer"] and len(p["answer"]) > 5 for p in general.prompts)
    assert all(len(t.split()) > 50 for t in general.texts)
    about = json.loads(forgetting.GENERAL_FILE.read_text().splitlines()[0])["about"]
    assert "Written for ftedge" in about and "Apache-2.0" in about


def test_user_general_prompts_are_added(tmp_path: Path) -> None:
    mine = tmp_path / "mine.jsonl"
    rows = [
        {"prompt": "Wie spät ist es?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]},
        {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]},
        {"text": "A paragraph of my own domain's text."},
    ]
    mine.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    general = forgetting.load_general(mine)
    assert len(general.prompts) == 43 and len(general.texts) == 7
    assert general.prompts[-3] == {"messages": [{"role": "user", "content": "Wie spät ist es?"}], "answer": None}
    assert general.prompts[-2]["messages"][0] == {"role": "system", "content": "Be brief."} and general.prompts[-2]["answer"] is None
    assert general.prompts[-1] == {"messages": [{"role": "user", "content": "Capital of Peru?"}], "answer": "Lima."}
    assert general.sources == ["ftedge general set", str(mine)]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("not json\n", "mine.jsonl:1: not a JSON object"),
        ('[1, 2]\n{"prompt": "ok"}\n', "mine.jsonl:1: expected a JSON object"),
        ('{"prompt": "ok"}\n{"question": "?"}\n', "mine.jsonl:2: no 'prompt', 'messages' or 'text'"),
        ('{"messages": [{"role": "assistant", "content": "yo"}]}\n', "ending with a user turn"),
        ("\n\n", "no prompts or texts"),
    ],
)
def test_bad_general_prompts_are_one_line_errors(tmp_path: Path, content: str, needle: str) -> None:
    mine = tmp_path / "mine.jsonl"
    mine.write_text(content)
    with pytest.raises(FtedgeError, match=needle) as err:
        forgetting.load_general(mine)
    assert "\n" not in err.value.one_line()
    with pytest.raises(FtedgeError, match="not found"):
        forgetting.load_general(tmp_path / "missing.jsonl")
