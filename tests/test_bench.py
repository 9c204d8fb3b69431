"""Bench: backends' logits against PyTorch, quality/speed measurement, results.json, report, plot, isolation.

One module-scoped run on the confident tiny model (trained on helpers.ROWS: it answers some test rows
right and some wrong) holds a small random LoRA adapter, the merged model, a GGUF f16 and an ONNX fp32
build, and is benched once (each artifact in its own process); the tests read it.
Threads are 1: llama.cpp's spinning worker threads collapse on an oversubscribed 2-core machine.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import LABELS, make_adapter, write_text_label_csv

from ftedge.bench import stage as bench
from ftedge.bench.measures import measure_quality, measure_speed
from ftedge.cli import main
from ftedge.data.splits import freeze_splits
from ftedge.errors import FtedgeError
from ftedge.export.gguf import convert_to_gguf
from ftedge.logits import grouped_kl, log_softmax, top_k
from ftedge.manifest import Run
from ftedge.recipe import load_recipe
from ftedge.results import BenchResults, Entry, load_results
from ftedge.targets import load_target

FAST = bench.SpeedConfig(decode_tokens=8, repeats=2, warmup=1)
EXAMPLE_CHAT = Path(__file__).resolve().parents[1] / "data" / "examples" / "support-chat.jsonl"
MESSAGES = [{"role": "system", "content": "Reply with the intent label."}, {"role": "user", "content": "my card has not arrived yet"}]


def _tiny_target(folder: Path, **extra) -> Path:
    raw = {
        "name": "tiny-cpu",
        "gguf": {"quants": ["f16"]},
        "onnx": {"precisions": ["fp32"]},
        "n_ctx": 512,
        "threads": 1,
        "max_size_mb": 64,
        "max_ram_mb": 8192,
        **extra,
    }
    path = folder / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _build_onnx(hf_dir: Path, out: Path, cache: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, confident_model_dir: Path) -> dict[str, Path]:
    """Adapter (random non-zero LoRA), merged model, GGUF f16 and ONNX fp32 of the confident tiny model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-artifacts")
    adapter = make_adapter(confident_model_dir, root / "adapter")
    model = AutoModelForCausalLM.from_pretrained(confident_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(root / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(confident_model_dir).save_pretrained(root / "merged")
    return {
        "base": confident_model_dir,
        "adapter": root / "adapter",
        "merged": root / "merged",
        "gguf": convert_to_gguf(root / "merged", root / "merged.f16.gguf", outtype="f16"),
        "onnx": _build_onnx(root / "merged", root / "onnx-fp32", root / "onnx-cache"),
    }


def _make_run(
    folder: Path,
    arts: dict[str, Path],
    *,
    include: tuple[str, ...] = ("adapter", "merged", "gguf", "onnx"),
    bench_only: list[str] | None = None,
    chat: bool = False,
    drift: bool = False,
) -> Run:
    if chat:  # the shipped `messages` example: 8 conversations, 2 validation and 2 test
        shutil.copy(EXAMPLE_CHAT, folder / "chat.jsonl")
        data = {"train": "chat.jsonl", "format": "messages", "val_fraction": 0.25, "test_fraction": 0.25}
        evaluation = {"task": "perplexity", "max_examples": 6, "generate": 2}
    else:
        write_text_label_csv(folder / "train.csv", n=40)
        data = {
            "train": "train.csv",
            "format": "text_label",
            "text_field": "text",
            "label_field": "category",
            "val_fraction": 0.25,
            "test_fraction": 0.3,
        }
        evaluation = {"task": "label_match", "max_examples": 6}
    recipe = {
        "name": "tiny",
        "base_model": str(arts["base"]),
        "data": {**data, "system_prompt": "Reply with the intent label." if not chat else "Answer briefly."},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "lora", "max_steps": 4},
        "eval": {**evaluation, "artifacts": bench_only, "drift": drift},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = Run.create(load_recipe(folder / "recipe.yaml"), run_dir=folder / "run")
    freeze_splits(run)  # what the train stage does: bench reads the test rows through the run
    layout = {"adapter": ("adapter", "adapter", "train", {"format": "peft"}), "merged": ("merged", "merged", "merge", {"format": "hf"}),
              "gguf": ("gguf-f16", "gguf/tiny.f16.gguf", "export", {"format": "gguf", "quant": "f16"}),
              "onnx": ("onnx-fp32", "onnx/fp32", "export", {"format": "onnx", "quant": "fp32"})}  # fmt: skip
    for what in include:
        key, rel, stage, meta = layout[what]
        dst = run.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if arts[what].is_dir() else shutil.copy)(arts[what], dst)
        run.record_artifact(key, dst, stage=stage, **meta)
    return run


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path]) -> tuple[Run, BenchResults, Path]:
    folder = tmp_path_factory.mktemp("bench-run")
    run = _make_run(folder, artifacts, drift=True)  # drift from base is measured here once, for every test that reads this run
    json_copy = folder / "copy" / "results.json"
    doc = bench.bench_run(run, load_target(_tiny_target(folder, ship="auto")), json_path=json_copy, speed=FAST)
    return run, doc, json_copy


# -- backends against PyTorch ---------------------------------------------------------
def test_torch_backend_logits_match_a_direct_transformers_forward(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(tiny_model_dir, threads=1)
    ids = backend.chat_ids(MESSAGES)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        direct = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = backend.logits(ids)
    assert got.shape == (len(ids), model.config.vocab_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct, atol=1e-5, rtol=1e-5)
    # greedy generation continues exactly as the direct model's argmax chain
    first = next(iter(backend.generate(ids, max_new_tokens=1, stop_ids=set())))
    assert first == int(direct[-1].argmax())


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_backend_logits_match_pytorch(kind: str, artifacts: dict[str, Path]) -> None:
    from ftedge.backends import load_backend
    from ftedge.backends.torch import TorchBackend

    ref = TorchBackend(artifacts["merged"], threads=1)
    other = load_backend(artifacts[kind], threads=1, n_ctx=512)
    try:
        assert other.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES)
        ids = ref.chat_ids(MESSAGES)
        assert other.chat_ids(MESSAGES) == ids
        a, b = ref.logits(ids), other.logits(ids)
        assert b.shape == a.shape
        tol = 2e-2 if kind == "gguf" else 1e-3  # f16 weights vs fp32
        assert np.abs(a - b).max() < tol * max(1.0, float(np.abs(a).max()))
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95
        kl = grouped_kl(*top_k(log_softmax(a)), log_softmax(b))
        assert kl.mean() < 1e-3
    finally:
        other.close()


# -- measurement in-process -----------------------------------------------------------
def test_quality_scores_label_match_and_reference_parity(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(artifacts["merged"], threads=1)
    prompts = [[{"role": "user", "content": t}] for t in ("where is my card", "rate for pounds", "i lost my card", "top up failed")]
    # the first two targets are what the model answers greedily, the last two are not
    answers = [bench_answer(backend, p) for p in prompts[:2]]
    examples = [{"messages": p, "target": t} for p, t in zip(prompts, [*answers, "not-this", "nor-this"], strict=True)]
    ref_file = tmp_path / "ref.npz"
    q = measure_quality(backend, examples, task="label_match", max_new_tokens=6, n_ctx=512, reference_out=ref_file)
    assert q["accuracy"] == 0.5
    assert q["perplexity"] > 1.0 and q["n_examples"] == 4
    again = measure_quality(backend, examples, task="perplexity", max_new_tokens=6, n_ctx=512, reference_in=ref_file)
    assert again["accuracy"] is None
    assert again["perplexity"] == pytest.approx(q["perplexity"], rel=1e-5)
    assert again["top1_agreement"] == 1.0 and again["kl"] == pytest.approx(0.0, abs=1e-6)
    # positions shared by every conversation (template header) are not scored N times
    from ftedge.bench.measures import conversation_ids
    from ftedge.logits import common_prefix

    fulls = [conversation_ids(backend, e["messages"], e["target"])[1] for e in examples]
    start = common_prefix(fulls) - 1
    assert start > 3 and again["parity_positions"] == sum(len(f) - 1 - start for f in fulls)


@pytest.fixture(scope="module")
def confident_artifacts(confident_model_dir: Path, confident_ggufs: dict[str, Path]) -> dict[str, Path]:
    """The confident tiny model (answers helpers.ROWS with margins of 3-4 nats) and its q8_0 and q4_0 GGUFs."""
    return {"torch": confident_model_dir, "q8_0": confident_ggufs["q8_0"], "q4_0": confident_ggufs["q4_0"]}


def _plain_answers(backend, examples, budget: int) -> list[str]:
    """What a runtime answers: the chat prompt, then greedy decoding token by token until an end-of-turn token."""
    stops = backend.stop_ids
    answers = []
    for ex in examples:
        ids = backend.tokenize(backend.apply_chat_template(ex["messages"], add_generation_prompt=True))
        tokens = []
        for tok in backend.generate(ids, max_new_tokens=budget, stop_ids=stops):
            if tok in stops:
                break
            tokens.append(tok)
        answers.append(backend.detokenize(tokens).strip())
    return answers


@pytest.mark.parametrize("kind", ["torch", "q8_0", "q4_0"])
def test_bench_answers_are_plain_decoding_row_for_row(kind: str, confident_artifacts: dict[str, Path]) -> None:
    """Issue 17: the teacher-forced shortcut must never change an answer; the budget comes from the labels."""
    from helpers import ROWS, SYSTEM

    from ftedge.backends.llamacpp import LlamaCppBackend
    from ftedge.backends.torch import TorchBackend
    from ftedge.bench.measures import ANSWER_SLACK, conversation_ids, greedy_answer

    path = confident_artifacts[kind]
    backend = TorchBackend(path, threads=1) if kind == "torch" else LlamaCppBackend(path, threads=1, n_ctx=512, flash_attn=False)
    unseen = [("how do i get a refund", "refund_request"), ("close my account now", "terminate_account"), ("rate for yen", "exchange_rate")]
    rows = [*ROWS, *unseen, (ROWS[0][0], "lost_or_stolen_card")]  # trained rows, new rows, a trained row with another label
    examples = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}], "target": label} for t, label in rows]
    try:
        q = measure_quality(backend, examples, task="label_match", n_ctx=512)
        convs = [conversation_ids(backend, ex["messages"], ex["target"]) for ex in examples]
        assert q["max_new_tokens"] == max(len(full) - len(prompt) for prompt, full in convs) + ANSWER_SLACK
        plain = _plain_answers(backend, examples, q["max_new_tokens"])
        # the margin rule decides: none to spare takes every gold answer whose tokens all lead; an impossible one decodes all
        prompt, full = convs[0]
        logp = log_softmax(backend.logits(full)[:-1])
        assert greedy_answer(backend, prompt, full, logp, 20, margin=0.0)[1] == 0
        assert greedy_answer(backend, prompt, full, logp, 20, margin=float("inf"))[1] > 0
    finally:
        backend.close()
    assert [p["answer"] for p in q["predictions"]] == plain
    assert q["accuracy"] == sum(a == label for a, (_, label) in zip(plain, rows, strict=True)) / len(rows)
    assert 0 < q["accuracy"] < 1
    taken = [not p["decoded"] for p in q["predictions"]]
    assert any(taken) and not all(taken)  # both paths ran: gold answers leading by the margin were taken, the rest decoded
    assert all(p["correct"] for p in q["predictions"] if not p["decoded"]) and not taken[-1]


def test_answer_budget_is_the_longest_label_plus_slack_capped() -> None:
    from ftedge.bench.measures import ANSWER_SLACK, answer_budget

    convs = [(list(range(10)), list(range(12))), (list(range(5)), list(range(5 + 17)))]  # answers of 2 and 17 tokens
    assert answer_budget(convs) == 17 + ANSWER_SLACK  # a 17-token label is answerable (the old constant was 16)
    assert answer_budget(convs, cap=20) == 20 and answer_budget(convs, cap=100) == 17 + ANSWER_SLACK


def bench_answer(backend, messages, max_new_tokens: int = 6) -> str:
    from ftedge.bench.measures import generate_text

    return generate_text(backend, backend.chat_ids(messages), max_new_tokens).strip()


class _Paced:
    """A runtime whose timing is known: the first token after ``first`` s, then steps of ``step`` s, every ``slow_every``-th
    step taking ``slow`` s instead (the slow tail). Only what measure_speed uses."""

    path = Path("paced")

    def __init__(self, first: float, step: float, slow: float, slow_every: int) -> None:
        self.first, self.step, self.slow, self.slow_every = first, step, slow, slow_every

    def chat_ids(self, messages) -> list[int]:
        return list(range(40))

    def stream(self, ids, max_new_tokens: int, stop_ids=()):
        import time

        time.sleep(self.first)
        for i in range(max_new_tokens):
            if i:
                time.sleep(self.slow if i % self.slow_every == 0 else self.step)
            yield 7


def test_speed_reports_ttft_prefill_and_decode(artifacts: dict[str, Path]) -> None:
    from ftedge.backends import load_backend

    with load_backend(artifacts["gguf"], threads=1, n_ctx=512) as backend:
        s = measure_speed(backend, MESSAGES, decode_tokens=8, repeats=3, warmup=1)
        prompt = len(backend.chat_ids(MESSAGES))
    assert s["prompt_tokens"] == prompt and s["decode_steps"] == 3 * 7
    assert s["ttft_ms"] > 0 and s["prefill_tok_s"] == pytest.approx(prompt / (s["ttft_ms"] / 1000), rel=1e-9)
    assert s["decode_tok_s"] > 0 and s["decode_tok_s_p95"] > 0
    # known timings: 40 prompt tokens in >= 50 ms; 7 steps per repeat, 6 of >= 5 ms and 1 of >= 80 ms (1 in 7 of all steps:
    # the 95th-percentile step is a slow one, so the slow tail's speed is <= 1 / 80 ms = 12.5 tok/s)
    paced = measure_speed(_Paced(first=0.05, step=0.005, slow=0.08, slow_every=4), MESSAGES, decode_tokens=8, repeats=3, warmup=1)
    assert paced["prompt_tokens"] == 40 and paced["decode_steps"] == 21
    assert 50 <= paced["ttft_ms"] < 250 and paced["prefill_tok_s"] == pytest.approx(40 / (paced["ttft_ms"] / 1000), rel=1e-9)
    assert 7 / 0.25 < paced["decode_tok_s"] <= 7 / (6 * 0.005 + 0.08)  # the median repeat: 7 steps in >= 110 ms
    assert 1 / 0.25 < paced["decode_tok_s_p95"] <= 1 / 0.08 < paced["decode_tok_s"]


def test_grouped_kl_is_a_tight_lower_bound() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 300)).astype(np.float32) * 3
    b = a + rng.normal(size=a.shape).astype(np.float32) * 0.3
    p, q = log_softmax(a), log_softmax(b)
    full = (np.exp(p) * (p - q)).sum(-1)
    grouped = grouped_kl(*top_k(p, 64), q)
    assert np.all(grouped <= full + 1e-6)
    assert np.all(grouped >= 0.5 * full)
    np.testing.assert_allclose(grouped_kl(*top_k(p, 300), q), full, rtol=1e-4, atol=1e-6)


# -- bench of a run ------------------------------------------------------------------
def test_results_json_schema_and_entries(benched) -> None:
    run, doc, json_copy = benched
    on_disk = json.loads((run.path / "bench" / "results.json").read_text())
    assert on_disk["schema"] == 1 and on_disk == json.loads(json_copy.read_text())
    assert load_results(json_copy) == doc  # what bench returned is what it wrote, read back through the schema
    names = [e["name"] for e in on_disk["artifacts"]]
    assert names == ["pytorch", "merged", "gguf-f16", "onnx-fp32"]
    assert on_disk["reference"] == "pytorch"
    for e in on_disk["artifacts"]:
        assert set(Entry.model_fields) <= set(e), e
        assert e["status"] == "ok", e
        assert e["size_bytes"] > 0 and e["peak_rss_mb"] > 10
        assert e["accuracy"] is not None and 0.0 <= e["accuracy"] <= 1.0
        assert e["perplexity"] > 1.0
        assert e["ttft_ms"] > 0 and e["prefill_tok_s"] > 0 and e["decode_tok_s"] > 0 and e["decode_tok_s_p95"] > 0
        assert e["fits"] is True  # every tiny artifact is under 64 MB and 8 GB
        phases = e["phase_seconds"]  # where the artifact's bench time went
        assert {"quality", "drift", "speed"} <= set(phases) and all(v > 0 for v in phases.values())
        assert e["load_seconds"] + sum(phases.values()) <= e["wall_seconds"]
    by = {e["name"]: e for e in on_disk["artifacts"]}
    assert by["pytorch"]["top1_agreement"] == 1.0 and by["pytorch"]["kl"] == 0.0
    # merged = base + adapter folded in: same behaviour as the reference, and so are the exports
    # the reference answers some rows right and some wrong, with different answers (not one blank answer everywhere)
    answers = {name: [r["answer"] for r in rows] for name, rows in on_disk["predictions"].items()}
    assert 0 < by["pytorch"]["accuracy"] < 1 and len(set(answers["pytorch"])) > 1 and all(answers["pytorch"])
    for name in ("merged", "gguf-f16", "onnx-fp32"):
        assert by[name]["top1_agreement"] >= 0.95, by[name]
        assert by[name]["kl"] < 1e-3, by[name]
        assert by[name]["perplexity"] == pytest.approx(by["pytorch"]["perplexity"], rel=0.02)
        assert answers[name] == answers["pytorch"], name  # row for row
        assert by[name]["accuracy"] == by["pytorch"]["accuracy"]
    assert by["gguf-f16"]["format"] == "gguf" and by["gguf-f16"]["quant"] == "f16"
    assert by["onnx-fp32"]["format"] == "onnx" and by["onnx-fp32"]["quant"] == "fp32"
    assert on_disk["target"]["threads"] == 1 and on_disk["eval"]["n_examples"] == 6
    # which rows: the first 6 of the test split; the runtime settings each artifact ran with; every row's answer
    assert on_disk["eval"]["split"] == "test" and on_disk["eval"]["n_available"] >= 6
    assert on_disk["eval"]["max_new_tokens"] > 8 and on_disk["eval"]["max_new_tokens_cap"] is None
    assert on_disk["target"]["runtime"] == {"flash_attn": False, "repack": "auto"}
    gguf_rt = by["gguf-f16"]["runtime"]
    assert gguf_rt["runtime"] == "llama.cpp" and gguf_rt["flash_attn"] is False and gguf_rt["threads"] == 1 and gguf_rt["extra_bufts"]
    assert by["pytorch"]["runtime"]["runtime"] == "torch" and by["onnx-fp32"]["runtime"]["threads"] == 1
    for name, rows in on_disk["predictions"].items():
        assert [r["row"] for r in rows] == list(range(6)), name
        assert sum(r["correct"] for r in rows) / 6 == by[name]["accuracy"]
    from ftedge.data.splits import run_splits

    test_rows = run_splits(run).test[:6]
    assert [r["target"] for r in on_disk["predictions"]["pytorch"]] == [e.target for e in test_rows]


def test_bench_stage_and_files_recorded_in_manifest(benched) -> None:
    run, _, _ = benched
    assert run.is_done("bench")
    arts = run.artifacts(stage="bench")
    assert {"bench-results", "bench-report", "bench-plot"} <= set(arts)


def test_report_and_plot_files(benched) -> None:
    run, _, _ = benched
    md = (run.path / "bench" / "report.md").read_text()
    for name in ("pytorch (ref)", "merged", "gguf-f16", "onnx-fp32", "decode tok/s", "tiny-cpu", "plot.png", "of the", "**test** split"):
        assert name in md
    assert md.count("\n| ") >= 5  # header + 4 artifacts
    png = (run.path / "bench" / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from matplotlib.image import imread

    img = imread(run.path / "bench" / "plot.png")
    assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # not a blank canvas


def test_table_lists_every_artifact(benched) -> None:
    from rich.console import Console

    from ftedge.bench import report

    run, doc, _ = benched
    console = Console(record=True, width=200)
    report.print_table(doc, console=console)
    text = console.export_text()
    for name in ("pytorch (ref)", "merged", "gguf-f16", "onnx-fp32"):
        assert name in text
    # a run is benched with its recipe's system prompt, and the table and report.md say so
    assert doc.eval.system_prompt_source == "run recipe" and doc.eval.own_system_rows == 0
    assert "system prompt: Reply with the intent label. (from run recipe)" in text
    assert "system prompt: Reply with the intent label. (from run recipe)" in (run.path / "bench" / "report.md").read_text()
    assert all(ex["messages"][0]["content"] == doc.eval.system_prompt for ex in _scored_examples(run))


def _scored_examples(run: Run) -> list[dict]:
    """The rows bench scored for a run, in order."""
    return bench.run_examples(run)[0]


def test_classification_figures_come_from_every_answer(benched) -> None:
    run, doc, _ = benched
    predictions = json.loads((run.path / "bench" / "predictions.json").read_text())
    held_out = _scored_examples(run)
    gold = sorted({ex["target"] for ex in held_out})
    for e in doc.artifacts:
        pairs = predictions[e.name]
        assert [p["target"] for p in pairs] == [ex["target"] for ex in held_out]  # every example, in order
        assert e.accuracy == sum(p["correct"] for p in pairs) / len(pairs)
        low, high = e.accuracy_ci
        assert 0.0 <= low <= e.accuracy <= high <= 1.0
        assert sorted(e.per_label) == gold and sum(v["support"] for v in e.per_label.values()) == len(held_out)
        assert e.macro_f1 == pytest.approx(np.mean([v["f1"] for v in e.per_label.values()]), abs=1e-3)
        assert sum(c["count"] for c in e.confusions) == sum(not p["correct"] for p in pairs)
        assert all(c["gold"] != c["predicted"] for c in e.confusions)
        assert e.perplexity_ci[0] < e.perplexity_ci[1]


def test_the_worker_returns_every_answer_not_a_sample(artifacts: dict[str, Path]) -> None:
    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(artifacts["merged"], threads=1)
    examples = [{"messages": [{"role": "user", "content": f"question {i}"}], "target": f"label_{i % 7}"} for i in range(57)]
    q = measure_quality(backend, examples, task="label_match", max_new_tokens=1, n_ctx=512)
    assert [p["target"] for p in q["predictions"]] == [ex["target"] for ex in examples]
    assert len(q["nll"]) == 57 and all(n > 0 and tokens >= 2 for n, tokens in q["nll"])
    nll = sum(n for n, _ in q["nll"]) / sum(t for _, t in q["nll"])
    assert q["perplexity"] == pytest.approx(np.exp(nll), rel=1e-6)


def test_drift_from_base_in_the_run(benched) -> None:
    _, doc, _ = benched
    base = doc.drift_base
    assert base.status == "ok" and base.general_prompts == 40 and base.general_texts == 6 and base.general_ppl > 1
    by = {e.name: e for e in doc.artifacts}
    ref = by["pytorch"]
    assert ref.drift_kl > 1e-5  # the random non-zero LoRA moved the model away from its base
    assert 0.0 <= ref.drift_top1 <= 1.0 and ref.drift_positions == base.answer_tokens > 40 and base.written_answers == 40
    assert ref.general_ppl != pytest.approx(base.general_ppl, rel=1e-6)
    for name in ("merged", "gguf-f16", "onnx-fp32"):  # faithful exports of the tuned model drift as much as it does
        assert by[name].drift_kl == pytest.approx(ref.drift_kl, rel=0.2, abs=2e-4), name
        assert by[name].general_ppl == pytest.approx(ref.general_ppl, rel=0.02), name
    md = (Path(doc.subject) / "bench" / "report.md").read_text()
    assert "## Drift from base" in md and "catastrophic forgetting" in md


def test_drift_is_zero_against_the_base_itself(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from ftedge.backends.torch import TorchBackend
    from ftedge.bench import forgetting

    general = forgetting.load_general()
    mine = {"messages": [{"role": "user", "content": "Say something."}], "answer": None}  # the base answers it itself
    subset = {"prompts": [*general.prompts[:3], mine], "texts": general.texts[:2]}
    base = TorchBackend(artifacts["base"], threads=1)
    info = forgetting.base_reference(base, subset, tmp_path / "base.npz", n_ctx=512)
    assert info["general_prompts"] == 4 and info["written_answers"] == 3 and info["general_texts"] == 2
    same = forgetting.drift(base, tmp_path / "base.npz")
    assert same["drift_kl"] == pytest.approx(0.0, abs=1e-6) and same["drift_top1"] == 1.0
    assert same["general_ppl"] == pytest.approx(info["general_ppl"], rel=1e-5)
    tuned = forgetting.drift(TorchBackend(artifacts["merged"], threads=1), tmp_path / "base.npz")
    assert tuned["drift_kl"] > 1e-5 and tuned["drift_positions"] == same["drift_positions"] == info["answer_tokens"]


def test_plot_shows_intervals_and_sizes(benched) -> None:
    from ftedge.bench.report import MAX_AREA, plot_points

    _, doc, _ = benched
    key, _, points = plot_points(doc)
    assert key == "accuracy" and len(points) == 4
    by = {e.name: e for e in doc.artifacts}
    for p in points:
        e = by[p["name"]]
        assert p["y"] - p["yerr"][0] == pytest.approx(e.accuracy_ci[0]) and p["y"] + p["yerr"][1] == pytest.approx(e.accuracy_ci[1])
    areas = {p["name"]: p["area"] for p in points}
    assert areas["gguf-f16"] < areas["merged"] and max(areas.values()) == MAX_AREA  # f16 is half the f32's bytes


def test_chat_run_shows_answers_side_by_side_with_chrf(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """The shipped `messages` example: each artifact's greedy answers next to the reference answers, scored with chrF."""
    from ftedge.backends import load_backend
    from ftedge.backends.torch import TorchBackend
    from ftedge.bench.generative import budget
    from ftedge.bench.report import md_cell

    run = _make_run(tmp_path, artifacts, include=("adapter", "gguf"), chat=True)
    doc = bench.bench_run(run, load_target(_tiny_target(tmp_path, onnx=None)), speed=FAST)
    held_out = _scored_examples(run)
    assert len(held_out) == 2
    by = {e.name: e for e in doc.artifacts}
    assert set(by) == {"pytorch", "gguf-f16"}
    md = (run.path / "bench" / "report.md").read_text()
    assert "## Answers side by side" in md and "chrF" in md
    runtimes = {
        "pytorch": lambda: TorchBackend(artifacts["base"], adapter=artifacts["adapter"], threads=1),
        "gguf-f16": lambda: load_backend(artifacts["gguf"], threads=1, n_ctx=512),
    }
    for name, open_backend in runtimes.items():
        e = by[name]
        assert e.status == "ok" and e.accuracy is None and e.macro_f1 is None and e.perplexity > 1
        assert 0.0 <= e.chrf <= 100.0 and e.chrf_ci[0] <= e.chrf_ci[1]
        assert len(e.generations) == 2
        with open_backend() as backend:
            tokens = budget(backend, [ex["target"] for ex in held_out])
            for g, ex in zip(e.generations, held_out, strict=True):
                assert g["prompt"] == ex["messages"][-1]["content"] and g["reference"] == ex["target"]
                stops = backend.stop_ids
                new = [t for t in backend.generate(backend.chat_ids(ex["messages"]), max_new_tokens=tokens, stop_ids=stops)]
                assert g["answer"] == backend.detokenize([t for t in new if t not in stops]).strip()  # what the runtime answers
                assert 0.0 <= g["chrf"] <= 100.0
                assert f"| {name} | {md_cell(g['answer']) or '(empty)'} |" in md
                assert f"| reference | {md_cell(ex['target'])} |" in md


@pytest.fixture(scope="module")
def ship_choice(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path], tiny_model_dir: Path):
    """A benched run with three GGUFs for `ship: auto` (tolerance 10 points) to choose from: the tuned model's f16 and
    q8_0, and a smaller q4_0 of another, untrained model, which answers no row right."""
    from ftedge.export.gguf import build_quant

    folder = tmp_path_factory.mktemp("ship-choice")
    q8 = build_quant(artifacts["gguf"], folder / "merged.q8_0.gguf", "q8_0", end_of_turn=2, threads=1)[0]
    other = convert_to_gguf(tiny_model_dir, folder / "other.f16.gguf", outtype="f16")
    other_q4 = build_quant(other, folder / "other.q4_0.gguf", "q4_0", end_of_turn=2, threads=1)[0]
    run = _make_run(folder, artifacts, include=("adapter", "gguf"))
    for quant, path in (("q8_0", q8), ("q4_0", other_q4)):
        dst = run.path / "gguf" / f"tiny.{quant}.gguf"
        shutil.copy(path, dst)
        run.record_artifact(f"gguf-{quant}", dst, stage="export", format="gguf", quant=quant)
    raw = dict(onnx=None, gguf={"quants": ["f16", "q8_0", "q4_0"]}, ship="auto", ship_tolerance=10)
    target = load_target(_tiny_target(folder, **raw))
    return run, bench.bench_run(run, target, speed=FAST), target


def test_ship_auto_decides_from_the_bench_results_and_writes_a_model_card(ship_choice, benched, tmp_path: Path) -> None:
    from ftedge.ship import ship_stage

    run, doc, target = ship_choice
    by = {e.name: e for e in doc.artifacts}
    assert by["gguf-q4_0"].size_bytes < by["gguf-q8_0"].size_bytes < by["gguf-f16"].size_bytes
    reference = by["pytorch"].accuracy
    assert by["gguf-q4_0"].accuracy < reference - 0.10 and by["gguf-q8_0"].accuracy == by["gguf-f16"].accuracy == reference
    decision = doc.ship_decision
    assert decision.metric == "accuracy" and decision.tolerance == 10 and decision.reference == "pytorch"
    # the rule decides: the smallest is too far from the reference, the next smallest is within tolerance, the largest loses on size
    verdicts = {c.name: c.verdict for c in decision.candidates}
    reasons = {c.name: c.reason for c in decision.candidates}
    assert decision.chosen == "gguf-q8_0" and decision.within_tolerance
    assert verdicts == {"pytorch": "reference", "gguf-f16": "qualifies", "gguf-q8_0": "chosen", "gguf-q4_0": "rejected"}
    gap = 100 * (reference - by["gguf-q4_0"].accuracy)
    assert f"{gap:.2f} points worse than the reference (tolerance 10.00 points)" in reasons["gguf-q4_0"]
    assert reasons["gguf-f16"].endswith("; larger than gguf-q8_0")
    md = (run.path / "bench" / "report.md").read_text()
    assert "## Ship decision (`ship: auto`)" in md and decision.summary in md
    benched_md = (benched[0].path / "bench" / "report.md").read_text()
    assert "ONNX: ship/ holds a GGUF" in benched_md  # why an ONNX folder is never shipped

    out = ship_stage(run, target)
    assert sorted(p.name for p in out.glob("*.gguf")) == ["tiny.q8_0.gguf"]
    assert (out / "tiny.q8_0.gguf").read_bytes() == run.artifact_path("gguf-q8_0").read_bytes()
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and str(run.path) not in readme
    _, front, body = readme.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "unknown" and meta["datasets"] == ["train.csv"] and "base_model" not in meta  # a local base model
    assert meta["metrics"] == ["accuracy", "f1"] and {"ftedge", "gguf", "q8_0", "lora"} <= set(meta["tags"])
    figures = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    shipped = by["gguf-q8_0"]
    assert figures == {"accuracy": round(shipped.accuracy, 4), "f1": shipped.macro_f1, "perplexity": round(shipped.perplexity, 4)}
    sections = ["## Intended use", "## Training recipe", "## Data", "## Evaluation", "## Limits", "## Why this file"]
    positions = [body.index(s) for s in [*sections, "## Chat with it", "## Serve it"]]
    assert positions == sorted(positions)
    assert "**gguf-q8_0 (shipped)**" in body and decision.summary in body
    for name in ("pytorch", "gguf-f16", "gguf-q4_0"):
        assert f"| {name}" in body
    # the card of a run whose bench measured drift from base (the module's run) has that section before its limits
    drift_card = (ship_stage(benched[0], load_target(_tiny_target(tmp_path, ship="auto"))) / "README.md").read_text()
    assert drift_card.index("## Evaluation") < drift_card.index("## Drift from base") < drift_card.index("## Limits")


def test_ship_auto_needs_the_bench(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    from ftedge.ship import ship_stage

    run = _make_run(tmp_path, artifacts, include=("merged", "gguf"))
    with pytest.raises(FtedgeError, match="ship: auto picks from the bench results") as err:
        ship_stage(run, load_target(_tiny_target(tmp_path, ship="auto")))
    assert f"ftedge bench {run.path}" in err.value.one_line()


def test_a_crashing_worker_loses_only_its_artifact(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    run = _make_run(tmp_path, artifacts, include=("merged", "gguf"))

    def command(job: Path, result: Path) -> list[str]:
        if job.name.startswith("gguf-f16"):
            return [sys.executable, "-c", "import os; os.abort()"]  # the runtime segfaults, say
        return bench.worker_command(job, result)

    doc = bench.bench_run(run, load_target(_tiny_target(tmp_path)), speed=FAST, command=command)
    by = {e["name"]: e for e in json.loads((run.path / "bench" / "results.json").read_text())["artifacts"]}
    assert by["merged"]["status"] == "ok" and by["merged"]["decode_tok_s"] > 0
    assert by["merged"]["reference"] is True  # no adapter in this run: merged is the reference
    assert by["gguf-f16"]["status"] == "failed" and "SIGABRT" in by["gguf-f16"]["error"]
    assert by["gguf-f16"]["decode_tok_s"] is None and by["gguf-f16"]["fits"] is None
    assert "gguf-f16" in (run.path / "bench" / "report.md").read_text()
    assert doc.artifacts[1].status == "failed" and run.is_done("bench")


def test_eval_artifacts_picks_what_to_bench(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    for sub in ("all", "some", "ref", "bad"):
        (tmp_path / sub).mkdir()
    every = [s.name for s in bench.run_specs(_make_run(tmp_path / "all", artifacts))]
    assert every == ["pytorch", "merged", "gguf-f16", "onnx-fp32"]
    some = bench.run_specs(_make_run(tmp_path / "some", artifacts, bench_only=["gguf-*", "onnx-fp32"]))
    assert [s.name for s in some] == ["pytorch", "gguf-f16", "onnx-fp32"] and some[0].reference
    # without an adapter the merged model is the reference and stays
    no_adapter = bench.run_specs(_make_run(tmp_path / "ref", artifacts, include=("merged", "gguf", "onnx"), bench_only=["onnx-*"]))
    assert [(s.name, s.reference) for s in no_adapter] == [("merged", True), ("onnx-fp32", False)]
    with pytest.raises(FtedgeError, match="'gguf-q4_k_m' matches no artifact"):
        bench.run_specs(_make_run(tmp_path / "bad", artifacts, bench_only=["gguf-q4_k_m"]))


def test_worker_job_is_one_typed_hand_off(tmp_path: Path) -> None:
    """The job travels as a BenchJob (the typed Target inside), written and parsed in one place; a bad job is a failed result."""
    from ftedge.bench import worker
    from ftedge.bench.job import BenchJob, SpeedJob

    target = load_target(_tiny_target(tmp_path, runtime={"flash_attn": True, "repack": False}, threads=3))
    job = BenchJob(name="gguf-f16", path="/m.gguf", target=target, examples=[{"messages": MESSAGES, "target": "x"}],
                   speed=SpeedJob(MESSAGES, 8, 2, 1), reference_in="/ref.npz", generate=2)  # fmt: skip
    back = BenchJob.read(job.write(tmp_path / "job.json"))
    assert back == job and back.target.runtime.flash_attn is True and back.threads == 3 and back.n_ctx == 512
    raw = json.loads((tmp_path / "job.json").read_text())
    assert raw["target"]["name"] == "tiny-cpu" and "threads" not in raw  # the target, not loose copies of its keys
    raw["runtime"] = {"flash_attn": False}
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(FtedgeError, match="unknown key.*runtime"):
        BenchJob.read(tmp_path / "bad.json")
    assert worker.main([str(tmp_path / "bad.json"), str(tmp_path / "result.json")]) == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and "runtime" in result["error"] and result["peak_rss_mb"] > 0


def test_fit_verdict_uses_the_target_budgets(tmp_path: Path) -> None:
    from ftedge.choose import fits

    target = load_target(_tiny_target(tmp_path, max_size_mb=1, max_ram_mb=100))
    assert fits(512 * 1024, 50.0, target) is True
    assert fits(2 * 1024 * 1024, 50.0, target) is False
    assert fits(512 * 1024, 150.0, target) is False
    no_budget = load_target(_tiny_target(tmp_path, max_size_mb=None, max_ram_mb=None))
    assert fits(10**12, 10**6, no_budget) is None


# -- standalone artifacts and bad input -----------------------------------------------
def test_standalone_gguf_bench_with_data(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    data = write_text_label_csv(tmp_path / "val.csv", n=4)
    out = tmp_path / "out.json"
    target = _tiny_target(tmp_path)
    result = CliRunner().invoke(main, ["bench", str(artifacts["gguf"]), "--target", str(target), "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and len(doc["artifacts"]) == 1
    e = doc["artifacts"][0]
    assert e["format"] == "gguf" and e["quant"] == "f16" and e["size_bytes"] == artifacts["gguf"].stat().st_size
    assert e["accuracy"] is not None and e["perplexity"] > 1 and e["decode_tok_s"] > 0
    assert e["top1_agreement"] is None  # no reference for a standalone file
    assert "merged.f16" in result.output
    assert doc["eval"]["split"] == "file" and doc["eval"]["n_examples"] == doc["eval"]["n_available"] == 4
    assert doc["eval"]["data"] == str(data.resolve()) and e["runtime"]["flash_attn"] is False
    rows = doc["predictions"][e["name"]]
    assert [r["row"] for r in rows] == [0, 1, 2, 3] and sum(r["correct"] for r in rows) / 4 == e["accuracy"]


def test_bench_data_in_recipe_formats(tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path) -> None:
    """--data is read by ftedge.data: a recipe's fields and system prompt, or data.* overrides, text_label or messages."""
    chats = tmp_path / "chats.jsonl"
    conv = [{"role": "user", "content": "where is my card"}, {"role": "assistant", "content": "card_arrival"}]
    chats.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(2)))
    cfg, ev = bench.data_file_config(chats, overrides=["data.format=messages", "data.system_prompt=Be brief.", "eval.max_new_tokens=4"])
    assert ev.max_new_tokens == 4
    assert bench.data_file_examples(chats, cfg)[0] == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where is my card"}],
        "target": "card_arrival",
    }
    labelled = write_text_label_csv(tmp_path / "new.csv", n=3)  # text + category, as the tiny recipe reads
    cfg, _ = bench.data_file_config(labelled, recipe=load_recipe(tiny_recipe))
    first = bench.data_file_examples(labelled, cfg)[0]
    assert first["messages"][0] == {"role": "system", "content": "Reply with the intent label."} and first["target"] in LABELS
    doc = bench.bench_artifact(
        artifacts["gguf"], load_target(_tiny_target(tmp_path)), data=chats, overrides=["data.format=messages"], speed=FAST
    )
    assert doc.eval.task == "label_match" and len(doc.predictions["merged.f16"]) == 2


def _spy_jobs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every BenchJob the stage hands a worker (the rows exactly as the worker sends them through ``chat_ids``)."""
    jobs: list = []
    real = bench.run_worker

    def spy(job, work_dir, **kwargs):
        jobs.append(job)
        return real(job, work_dir, **kwargs)

    monkeypatch.setattr(bench, "run_worker", spy)
    return jobs


def test_a_shipped_gguf_is_benched_with_the_system_prompt_it_is_served_with(
    tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ftedge bench RUN/ship/MODEL.gguf --data FILE` asks what chat and serve ask: the run recipe's system prompt."""

    from ftedge.backends import load_backend

    system = load_recipe(tiny_recipe).data.system_prompt
    assert system
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    (run.path / "ship").mkdir()
    shipped = Path(shutil.copy(artifacts["gguf"], run.path / "ship" / "tiny.f16.gguf"))
    data = write_text_label_csv(tmp_path / "test.csv", n=3)  # text,category: no system column
    out = tmp_path / "out.json"
    jobs = _spy_jobs(monkeypatch)
    target = _tiny_target(tmp_path)
    result = CliRunner().invoke(main, ["bench", str(shipped), "--target", str(target), "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"system prompt: {system} (from run recipe)" in result.output
    asked = [ex["messages"] for ex in jobs[0].examples]
    assert len(asked) == 3 and all(m[0] == {"role": "system", "content": system} and m[1]["role"] == "user" for m in asked)
    doc = load_results(out)
    assert (doc.eval.system_prompt, doc.eval.system_prompt_source, doc.eval.own_system_rows) == (system, "run recipe", 0)
    with load_backend(shipped, threads=1, n_ctx=512) as backend:  # the runtime's own count of the first row's prompt
        with_system, bare = len(backend.chat_ids(asked[0])), len(backend.chat_ids(asked[0][1:]))
    assert doc.speed.prompt_tokens == with_system != bare
    # the same bundle copied out of its run: its Modelfile's SYSTEM line, as `ftedge serve ship/` reads it
    from ftedge.formats.modelfile import write_modelfile
    from ftedge.session import SystemPrompt, resolve

    alone = tmp_path / "elsewhere" / "ship"
    alone.mkdir(parents=True)
    copied = Path(shutil.copy(shipped, alone / shipped.name))
    write_modelfile(copied, alone / "Modelfile", system="Answer with one label.")
    assert resolve(alone) == (copied, SystemPrompt("Answer with one label.", "ship/Modelfile"))
    doc = bench.bench_artifact(copied, load_target(target), data=data, speed=FAST)
    assert (doc.eval.system_prompt, doc.eval.system_prompt_source) == ("Answer with one label.", "ship/Modelfile")
    assert jobs[-1].examples[0]["messages"][0] == {"role": "system", "content": "Answer with one label."}
    # -o data.system_prompt= (empty) asks without one, and says so
    doc = bench.bench_artifact(copied, load_target(target), data=data, overrides=["data.system_prompt="], speed=FAST)
    assert doc.eval.system_prompt is None and doc.eval.system_prompt_source == "-o data.system_prompt"
    assert [m["role"] for m in jobs[-1].examples[0]["messages"]] == ["user"]


def test_bench_data_with_a_system_column_asks_each_row_with_its_own(
    tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row's own system prompt (a `system` column) wins over the artifact's; rows without one get the artifact's."""

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    (run.path / "gguf").mkdir()
    model = Path(shutil.copy(artifacts["gguf"], run.path / "gguf" / "tiny.f16.gguf"))
    data = tmp_path / "test.csv"
    rows = [("where is my new card", "card_arrival", "Row one's prompt."), ("i lost my card", "lost_or_stolen_card", "Row two's.")]
    rows.append(("rate for pounds", "exchange_rate", ""))  # an empty cell: the artifact's prompt
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category", "system"])
        w.writerows(rows)
    jobs = _spy_jobs(monkeypatch)
    target = _tiny_target(tmp_path)
    result = CliRunner().invoke(main, ["bench", str(model), "--target", str(target), "--data", str(data)])
    assert result.exit_code == 0, result.output
    asked = [ex["messages"][0]["content"] for ex in jobs[0].examples]
    assert asked == ["Row one's prompt.", "Row two's.", "Reply with the intent label."]
    assert "system prompt: Reply with the intent label. (from run recipe); 2 of 3 rows with their own" in result.output
    # every row with its own; -o data.system_prompt only fills the rows without one
    data.write_text("text,category,system\nhello,card_arrival,Mine.\n")
    doc = bench.bench_artifact(model, load_target(target), data=data, overrides=["data.system_prompt=Other."], speed=FAST)
    assert jobs[-1].examples[0]["messages"][0]["content"] == "Mine." and doc.eval.own_system_rows == 1
    from ftedge.bench.report import doc_system_line

    assert doc_system_line(doc) == "system prompt: each row's own (from the data: a system column or turn)"


def test_standalone_speed_only(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    doc = bench.bench_artifact(artifacts["onnx"], load_target(_tiny_target(tmp_path)), speed=FAST)
    e = doc.artifacts[0]
    assert e.accuracy is None and e.perplexity is None and e.decode_tok_s > 0 and e.ttft_ms > 0


def _bench_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bench", *args])
    return result.exit_code, result.output


def test_bad_inputs_are_one_line_exit_2(tmp_path: Path, artifacts: dict[str, Path], tiny_recipe: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(artifacts["gguf"].read_bytes()[:200_000])
    not_model = tmp_path / "folder"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hi")
    bad_data = tmp_path / "bad.csv"
    bad_data.write_text("a,b\n1,2\n")
    empty_run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "empty-run")
    cases = [
        ((str(tmp_path / "missing.gguf"),), "not found"),
        ((str(truncated),), "truncated"),
        ((str(not_model),), "not a model folder"),
        ((str(empty_run.path),), "no artifacts in"),
        ((str(artifacts["gguf"]), "--data", str(bad_data)), "row has no 'text'"),
        ((str(artifacts["gguf"]), "--data", str(bad_data), "-o", "train.max_steps=2"), "bench takes data.KEY=VALUE"),
        ((str(empty_run.path), "--data", str(bad_data)), "for a standalone artifact"),
        ((str(artifacts["gguf"]), "--data", str(tmp_path / "nope.csv")), "not found"),
    ]
    for args, needle in cases:
        code, out = _bench_cli(*args)
        assert code == 2, (args, out)
        assert needle in out, (args, out)
        assert len([ln for ln in out.splitlines() if ln.strip()]) == 1, out
    assert "ftedge export" in _bench_cli(str(empty_run.path))[1]


def test_data_file_formats(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "hi", "label": "greet"}) + "\n\n" + json.dumps({"text": "bye", "label": "leave"}) + "\n")
    ex = bench.data_file_examples(jl, bench.data_file_config(jl)[0])
    assert ex == [
        {"messages": [{"role": "user", "content": "hi"}], "target": "greet"},
        {"messages": [{"role": "user", "content": "bye"}], "target": "leave"},
    ]
    intents = tmp_path / "i.csv"
    intents.write_text("text,intent\nhello,greet\n")  # the label column is found among label/category/intent/target/answer
    assert bench.data_file_examples(intents, bench.data_file_config(intents)[0])[0]["target"] == "greet"
    broken = tmp_path / "e.jsonl"
    broken.write_text('{"text": "hi", "label": "x"}\nnot json\n')
    with pytest.raises(FtedgeError, match=r"e.jsonl:line 2"):
        bench.data_file_examples(broken, bench.data_file_config(jl)[0])
    empty_label = tmp_path / "f.csv"
    empty_label.write_text("text,label\nhello,\n")
    with pytest.raises(FtedgeError, match="row 1: row has no 'label'"):
        bench.data_file_examples(empty_label, bench.data_file_config(empty_label)[0])
    text = tmp_path / "d.txt"
    text.write_text("hello")
    with pytest.raises(FtedgeError, match="unsupported"):
        bench.data_file_examples(text, bench.data_file_config(text)[0])


def test_every_backend_reports_its_context_length(artifacts: dict[str, Path]) -> None:
    """chat and bench size prompts from Backend.context_length, whatever the runtime."""
    import json as _json

    from ftedge.backends import load_backend

    genai = _json.loads((artifacts["onnx"] / "genai_config.json").read_text())["model"]["context_length"]
    expected = {"merged": 512, "gguf": 256, "onnx": genai}  # max_position_embeddings, the n_ctx asked for, the builder's
    for what, want in expected.items():
        with load_backend(artifacts[what], threads=1, n_ctx=256) as backend:
            assert backend.context_length == want, (what, backend.context_length)


def test_bench_refuses_when_the_data_file_changed_since_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The test rows are the ones frozen at train time: a changed data file is refused in one line, before any worker."""
    from helpers import make_adapter, make_run

    run = make_run(tmp_path, tiny_model_dir, make_adapter(tiny_model_dir, tmp_path / "adapter"))
    data = tmp_path / "train.csv"
    data.write_text(data.read_text().upper())  # every row changed (case only: still another row as written)
    with pytest.raises(FtedgeError) as err:
        bench.bench_run(run, load_target(_tiny_target(tmp_path)), speed=FAST)
    msg = str(err.value)
    assert "\n" not in msg and f"data file {data} changed since run {run.path} was trained" in msg
    assert run.stage_status("bench") == "pending" and not (run.path / "bench").exists()
