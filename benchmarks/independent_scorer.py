"""Score a GGUF on a labelled CSV with llama-cpp-python's own chat completion, and compare with `ftedge bench --data`.

An independent check of ftedge's bench: every row's prompt goes through ``llama_cpp.Llama.create_chat_completion``
(the GGUF's own chat template, ``temperature=0``, ``repeat_penalty=1.0``: greedy) and the answer counts when it equals
the label after trimming. Nothing of ftedge's scoring is used: not its backend, prompt building, teacher-forced
shortcut or data reader. What is shared on purpose is the runtime configuration, taken from the same target profile:
threads, flash attention, and ftedge's rule for llama.cpp's extra buffer types (weight repacking), which must stay
off for quantized GGUFs on AMX CPUs (ggml's AMX path segfaults; ``Llama()`` cannot pass ``use_extra_bufts``, so it is
set on the model parameters while the model loads). The answer budget is the same: the longest label in tokens, plus
its end-of-turn token, plus 8. Each row starts from an empty KV cache, as ftedge's bench does (``--reuse-prefix`` keeps
llama-cpp-python's prefix cache, as a server would).

Then it runs ``ftedge bench GGUF --data CSV`` with the same profile and system prompt (or reads its ``--json`` output
via ``--bench-json``) and compares the two row by row.

    python benchmarks/independent_scorer.py ship/model.q4_k_m.gguf unseen.csv \\
        --system-prompt "Give the banking intent label." --label-field category --out scorer.json

Exit code 0 when the accuracies agree within ``--tolerance`` points (default 1), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LABEL_COLUMNS = ("label", "category", "intent", "target", "answer")
ANSWER_SLACK = 8


def read_rows(path: Path, text_field: str, label_field: str | None) -> tuple[list[tuple[str, str]], str]:
    """(text, label) of every row of a CSV or JSONL file, and the label column used."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no rows")
    label_field = label_field or next((c for c in LABEL_COLUMNS if c in rows[0]), None)
    if label_field is None or text_field not in rows[0]:
        raise SystemExit(f"{path}: needs columns {text_field!r} and a label ({'/'.join(LABEL_COLUMNS)} or --label-field)")
    return [(str(r[text_field]), str(r[label_field]).strip()) for r in rows], label_field


@contextlib.contextmanager
def model_params_with_extra_bufts(enabled: bool) -> Iterator[None]:
    """Make ``Llama()`` load with ``use_extra_bufts=enabled`` (it does not take the parameter itself)."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = enabled
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def score(gguf: Path, rows: list[tuple[str, str]], *, system: str | None, threads: int, flash_attn: bool, repack: Any, n_ctx: int,
          reuse_prefix: bool) -> dict[str, Any]:  # fmt: skip
    from llama_cpp import Llama

    from ftedge.backends.llamacpp import extra_bufts_enabled  # the one rule for repacking and the AMX crash
    from ftedge.formats.gguf import inspect_gguf

    extra_bufts = extra_bufts_enabled(inspect_gguf(gguf), repack)
    with model_params_with_extra_bufts(extra_bufts):
        llm = Llama(
            str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            flash_attn=flash_attn,
            chat_format="chat_template.default",  # the GGUF's own template, never a guessed built-in format
            verbose=False,
        )
    longest = max(len(llm.tokenize(label.encode("utf-8"), add_bos=False, special=False)) for _, label in rows)
    budget = longest + 1 + ANSWER_SLACK
    head = [{"role": "system", "content": system}] if system else []
    answers: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, (text, label) in enumerate(rows):
        if not reuse_prefix:
            llm.reset()
        out = llm.create_chat_completion([*head, {"role": "user", "content": text}], temperature=0.0, repeat_penalty=1.0, max_tokens=budget)
        answer = (out["choices"][0]["message"]["content"] or "").strip()
        answers.append({"row": i, "target": label, "answer": answer, "correct": answer == label})
    correct = sum(a["correct"] for a in answers)
    return {
        "accuracy": correct / len(answers),
        "n": len(answers),
        "max_tokens": budget,
        "settings": {
            "threads": threads,
            "flash_attn": flash_attn,
            "extra_bufts": extra_bufts,
            "n_ctx": n_ctx,
            "reuse_prefix": reuse_prefix,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "predictions": answers,
    }


def run_ftedge(gguf: Path, data: Path, *, target: str, system: str | None, text_field: str, label_field: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ftedge.cli", "bench", str(gguf), "--data", str(data), "--target", target, "--json", str(out)]
    cmd += ["-o", f"data.text_field={text_field}", "-o", f"data.label_field={label_field}"]
    if system:
        cmd += ["-o", f"data.system_prompt={system}"]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text(encoding="utf-8"))


def compare(mine: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    """Row-by-row comparison with an ftedge results.json (its ``predictions`` of the one artifact)."""
    name = bench["artifacts"][0]["name"]
    theirs = {p["row"]: p for p in bench["predictions"][name]}
    both = [(a, theirs[a["row"]]) for a in mine["predictions"] if a["row"] in theirs]
    differ = [
        {"row": a["row"], "target": a["target"], "scorer": a["answer"], "ftedge": b["answer"]}
        for a, b in both
        if a["answer"] != b["answer"]
    ]
    ftedge_acc = sum(b["correct"] for _, b in both) / len(both)
    scorer_acc = sum(a["correct"] for a, _ in both) / len(both)
    return {
        "rows_compared": len(both),
        "scorer_accuracy": scorer_acc,
        "ftedge_accuracy": ftedge_acc,
        "difference_points": round(100 * (ftedge_acc - scorer_acc), 2),
        "rows_answered_differently": len(differ),
        "ftedge_runtime": bench["artifacts"][0].get("runtime"),
        "ftedge_max_new_tokens": bench["eval"].get("max_new_tokens"),
        "examples": differ[:20],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("data", type=Path, help="labelled .csv or .jsonl (text + label columns)")
    ap.add_argument("--system-prompt", default=None, help="the system prompt the model was tuned with")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default=None, help=f"default: the first of {', '.join(LABEL_COLUMNS)}")
    ap.add_argument("--target", default="laptop-cpu", help="ftedge target profile: threads, n_ctx, runtime.flash_attn / repack")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    ap.add_argument(
        "--bench-json", type=Path, default=None, help="compare with this `ftedge bench --data --json` output instead of running it"
    )
    ap.add_argument("--reuse-prefix", action="store_true", help="keep llama-cpp-python's KV prefix cache between rows")
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy difference allowed, in points")
    ap.add_argument("--out", type=Path, default=None, help="write the scorer's answers and the comparison here (JSON)")
    args = ap.parse_args(argv)

    from ftedge.targets import load_target

    target = load_target(args.target)
    if target.runtime.flash_attn == "auto":
        raise SystemExit("llama_cpp.Llama takes flash_attn true or false only; use a profile with runtime.flash_attn: true|false")
    rows, label_field = read_rows(args.data, args.text_field, args.label_field)
    data = args.data
    with tempfile.TemporaryDirectory(prefix="scorer-") as tmp:
        if args.limit:
            rows = rows[: args.limit]
            data = Path(tmp) / f"first-{args.limit}.csv"
            with open(data, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow([args.text_field, label_field])
                w.writerows(rows)
        mine = score(args.gguf, rows, system=args.system_prompt, threads=target.threads, flash_attn=bool(target.runtime.flash_attn),
                     repack=target.runtime.repack, n_ctx=target.n_ctx, reuse_prefix=args.reuse_prefix)  # fmt: skip
        print(f"scorer (llama-cpp-python chat completion): accuracy {mine['accuracy']:.4f} on {mine['n']} rows in {mine['seconds']} s")
        if args.bench_json:
            bench = json.loads(args.bench_json.read_text(encoding="utf-8"))
        else:
            bench = run_ftedge(args.gguf, data, target=args.target, system=args.system_prompt, text_field=args.text_field,
                               label_field=label_field, out=Path(tmp) / "bench.json")  # fmt: skip
    result = compare(mine, bench)
    print(
        f"ftedge bench: accuracy {result['ftedge_accuracy']:.4f}; difference {result['difference_points']:+.2f} points; "
        f"{result['rows_answered_differently']} of {result['rows_compared']} rows answered differently"
    )
    for d in result["examples"][:5]:
        print(f"  row {d['row']}: label {d['target']!r}, scorer {d['scorer']!r}, ftedge {d['ftedge']!r}")
    if args.out:
        args.out.write_text(json.dumps({"scorer": mine, "comparison": result}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if abs(result["difference_points"]) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
