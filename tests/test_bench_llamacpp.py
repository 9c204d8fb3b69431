"""Bench's answers equal llama-cpp-python's own chat completion, row for row (what benchmarks/independent_scorer.py
checks on real models, here on the confident tiny model's q8_0 GGUF): the GGUF's own chat template through
``llama_cpp.Llama.create_chat_completion``, greedy, each row from an empty cache, with bench's answer budget."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner
from helpers import ROWS, SYSTEM

from ftedge.cli import main

REPO = Path(__file__).resolve().parents[1]
# trained rows (answered with their labels), unseen rows (other answers, some running to the budget),
# and a trained row with another label (answered wrong)
UNSEEN = [("how do i get a refund", "refund_request"), ("close my account now", "terminate_account"), ("rate for yen", "exchange_rate")]
DATA = [*ROWS, *UNSEEN, (ROWS[0][0], "lost_or_stolen_card")]


def _llama_cpp_answers(gguf: Path, rows: list[tuple[str, str]], max_tokens: int) -> list[str]:
    from llama_cpp import Llama

    from ftedge.backends.llamacpp import extra_bufts_enabled
    from ftedge.formats.gguf import inspect_gguf

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from independent_scorer import model_params_with_extra_bufts  # ggml's AMX path crashes on quantized files
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    with model_params_with_extra_bufts(extra_bufts_enabled(inspect_gguf(gguf), "auto")):
        llm = Llama(str(gguf), n_ctx=512, n_threads=1, n_threads_batch=1, n_gpu_layers=0, flash_attn=False,
                    chat_format="chat_template.default", verbose=False)  # fmt: skip
    answers = []
    for text, _ in rows:
        llm.reset()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        out = llm.create_chat_completion(messages, temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens)
        answers.append((out["choices"][0]["message"]["content"] or "").strip())
    llm.close()
    return answers


def test_bench_answers_equal_llama_cpp_python_chat_completion(tmp_path: Path, confident_ggufs: dict[str, Path]) -> None:
    gguf = confident_ggufs["q8_0"]
    data = tmp_path / "rows.csv"
    with open(data, "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "category"), *DATA])
    target = tmp_path / "cpu.yaml"
    target.write_text(yaml.safe_dump({"name": "cpu", "gguf": {"quants": ["q8_0"]}, "n_ctx": 512, "threads": 1,
                                      "runtime": {"flash_attn": False, "repack": "auto"}}))  # fmt: skip
    out = tmp_path / "bench.json"
    args = ["bench", str(gguf), "--data", str(data), "--target", str(target), "--json", str(out), "-o", f"data.system_prompt={SYSTEM}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    predictions = doc["predictions"][doc["artifacts"][0]["name"]]
    assert [p["row"] for p in predictions] == list(range(len(DATA)))
    assert [p["target"] for p in predictions] == [label for _, label in DATA]
    ftedge = [p["answer"] for p in predictions]

    theirs = _llama_cpp_answers(gguf, DATA, doc["eval"]["max_new_tokens"])
    assert ftedge == theirs  # row for row
    # not a vacuous agreement: right and wrong answers, of several kinds
    correct = [a == label for a, (_, label) in zip(theirs, DATA, strict=True)]
    assert any(correct) and not all(correct) and len(set(theirs)) > 2
    assert doc["artifacts"][0]["accuracy"] == sum(correct) / len(DATA)
