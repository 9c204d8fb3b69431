"""The bench stage: accuracy and latency of every artifact through its backend, side by side.

``bench_run`` scores every artifact of a run (the PyTorch base+adapter reference, merged, each
GGUF quant, each ONNX variant) on the same rows of the **test** split frozen into the run at train time
(never trained, validated, gated or calibrated on; ``ftedge.data.splits.run_splits``) and prompts, under the target profile's threads
and llama.cpp runtime settings; ``bench_artifact`` does the same for one standalone ``.gguf`` or
ORT GenAI folder, on any labelled file in a recipe format (``--data``, read by ``ftedge.data.reading``).
results.json says which split and how many rows were scored, the runtime settings of each
artifact, and every row's answer. Each artifact runs in its own process (``ftedge.bench.worker``),
so a runtime crash loses only that artifact's entry, and peak RSS is that artifact's own.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge import __version__
from ftedge.backends.base import detect_format
from ftedge.bench.job import BenchJob, SpeedJob
from ftedge.choose import fits
from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.results import MEASURED_KEYS, BenchResults, DriftBase, Entry, EvalInfo, HostInfo, SpeedInfo, TargetInfo, write_results
from ftedge.targets import Target

log = logging.getLogger(__name__)

MB = 1024 * 1024
DEFAULT_SPEED_PROMPT = "Explain in two sentences why the sky is blue."
LABEL_COLUMNS = ("label", "category", "intent", "target", "answer")


@dataclass(frozen=True)
class SpeedConfig:
    """Speed protocol: greedy decode of ``decode_tokens`` tokens (stop tokens ignored), ``repeats`` timed runs after ``warmup``."""

    decode_tokens: int = 64
    repeats: int = 5
    warmup: int = 1


@dataclass
class ArtifactSpec:
    """One artifact to bench: how to find it, label it and load it."""

    name: str
    format: str
    quant: str | None
    path: Path
    size_bytes: int | None = None
    load: dict[str, Any] = field(default_factory=dict)
    reference: bool = False
    gate_passed: bool | None = None  # the export's parity-gate verdict, when recorded


# -- what to bench ---------------------------------------------------------------
def _hf_dtype(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "f32"
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, dtype)


def _model_size(path: Path) -> int:
    """Bytes of a file, or of a folder's weight files (all files when it has none)."""
    if path.is_file():
        return path.stat().st_size
    weights = [p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".onnx", ".data", ".gguf", ".bin")]
    files = weights or [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def select_artifacts(models: list[ArtifactSpec], patterns: list[str] | None, where: Path) -> list[ArtifactSpec]:
    """The models whose name matches one of ``patterns`` (globs); all of them for None."""
    if patterns is None:
        return models
    names = [m.name for m in models]
    for pat in patterns:
        if not fnmatch.filter(names, pat):
            raise FtedgeError(
                f"eval.artifacts: {pat!r} matches no artifact of {where} ({', '.join(names)})",
                hint="fix the name or glob in the recipe's eval.artifacts",
            )
    return [m for m in models if any(fnmatch.fnmatchcase(m.name, pat) for pat in patterns)]


def run_specs(run: Run) -> list[ArtifactSpec]:
    """The reference (PyTorch base+adapter, else merged) first, then merged, GGUFs, ONNX variants."""
    recipe = run.recipe()
    models: list[ArtifactSpec] = []
    for art in run.models():
        quant = art.quant or (_hf_dtype(art.path) if art.format == "hf" and art.path.is_dir() else None)
        load = {"trust_remote_code": recipe.trust_remote_code} if art.format == "hf" else {}
        models.append(ArtifactSpec(art.key, art.format or "", quant, art.path, art.size_bytes, load, gate_passed=art.gate_passed))
    adapter = run.artifact("adapter")
    if not models and adapter is None:
        raise FtedgeError(f"no artifacts in {run.path}", hint=f"run `ftedge export {run.path}` first")
    order = {"hf": 0, "gguf": 1, "onnx": 2}
    models.sort(key=lambda s: (order.get(s.format, 3), s.name))
    specs: list[ArtifactSpec] = []
    if adapter is not None:
        from ftedge.loader import training_tokenizer

        base = run.base_model()  # the recipe's base model, or train.init_from's merged model
        four_bit = recipe.quant.bits == 4
        load: dict[str, Any] = {"kind": "torch", "adapter": str(adapter.path), "trust_remote_code": recipe.trust_remote_code}
        # the base rendered with the template the adapter was trained with (the recipe's, or thinking off)
        load["chat_template"] = training_tokenizer(base, recipe.chat_template, trust_remote_code=recipe.trust_remote_code).chat_template
        if four_bit:
            load["four_bit"] = recipe.quant.model_dump()
        quant = recipe.quant.type if four_bit else _hf_dtype(base)
        kind = recipe.adapter.method if recipe.train.method != "full" else "full"
        specs.append(
            ArtifactSpec("pytorch", "torch", f"{quant}+{kind}", base, _model_size(base) + _model_size(adapter.path), load, reference=True)
        )
    elif models[0].format == "hf":
        models[0].reference = True
    chosen = {m.name for m in select_artifacts(models, recipe.eval.artifacts, run.path)}
    return specs + [m for m in models if m.reference or m.name in chosen]


def _example_dicts(examples: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"messages": [dict(m) for m in ex.messages], "target": str(ex.target)} for ex in examples]


def run_examples(run: Run) -> tuple[list[dict[str, Any]], int]:
    """The first ``eval.max_examples`` rows of the run's test split (frozen at train time) as plain dicts {messages, target},
    and the split's size."""
    from ftedge.data.splits import run_splits

    test = run_splits(run).test
    return _example_dicts(test[: run.recipe().eval.max_examples]), len(test)


def data_file_config(path: Path, *, recipe: Any | None = None, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """The (DataConfig, EvalConfig) a data file is read and scored with: a recipe's data/eval sections (else the defaults:
    text_label with a ``text`` column and a label/category/intent/target/answer column), then ``data.KEY=VALUE`` /
    ``eval.KEY=VALUE`` overrides."""
    from pydantic import ValidationError

    from ftedge.data.reading import read_rows
    from ftedge.recipe import DataConfig, EvalConfig, apply_overrides

    path = Path(path)
    if not path.is_file():
        raise FtedgeError(f"data file {path} not found", hint="give a labelled .csv or .jsonl file in a recipe format")
    keep = {"val": None, "test": None, "max_examples": None}
    raw: dict[str, Any] = {
        "data": {**(recipe.data.model_dump() if recipe is not None else {}), **keep, "train": str(path)},
        "eval": recipe.eval.model_dump() if recipe is not None else {},
    }
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(("data.", "eval.")):
            raise FtedgeError(f"override {item!r}: bench takes data.KEY=VALUE or eval.KEY=VALUE", hint="e.g. -o data.label_field=intent")
    raw = apply_overrides(raw, list(overrides))
    given = {part.split("=", 1)[0].strip() for part in overrides}
    data = raw["data"]
    if recipe is None and data.get("format", "text_label") == "text_label" and "data.label_field" not in given:
        rows = read_rows(path)
        columns = set(rows[0][1]) if rows else set()
        data["label_field"] = next((c for c in LABEL_COLUMNS if c in columns), "label")
    try:
        return DataConfig.model_validate(data), EvalConfig.model_validate(raw["eval"])
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise FtedgeError(f"bench --data {path}: {loc}: {first['msg']}", hint="`ftedge validate --explain` lists the data keys") from None


def data_file_examples(path: Path, cfg: Any) -> list[dict[str, Any]]:
    """Every row of a labelled data file, read by ``ftedge.data.reading`` in the config's format, as plain dicts {messages, target}."""
    from ftedge.data.reading import examples_from_file

    examples = examples_from_file(Path(path), cfg)
    if not examples:
        raise FtedgeError(f"{path}: no rows", hint="give a labelled .csv or .jsonl file with at least one row")
    if any(ex.raw for ex in examples):
        raise FtedgeError(f"{path}: rows without a prompt cannot be scored", hint="give prompt/completion, messages or text_label rows")
    return _example_dicts(examples)


# -- running workers -------------------------------------------------------------
def worker_command(job_path: Path, result_path: Path) -> list[str]:
    return [sys.executable, "-m", "ftedge.bench.worker", str(job_path), str(result_path)]


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_worker(job: BenchJob, work_dir: Path, *, command: Callable[[Path, Path], list[str]] | None = None) -> dict[str, Any]:
    """Run one job in a child process; a crash or error yields a failed result, never an exception."""
    work_dir.mkdir(parents=True, exist_ok=True)
    name = job.name
    job_path, result_path, log_path = work_dir / f"{name}.job.json", work_dir / f"{name}.result.json", work_dir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    job.write(job_path)
    cmd = (command or worker_command)(job_path, result_path)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result: dict[str, Any] | None = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except ValueError:
            result = None
    if result is None:
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        tail = _last_line(log_path)
        result = {"status": "failed", "error": f"bench worker crashed ({why})" + (f": {tail}" if tail else "")}
    # The worker reports its own peak (VmHWM); wait4's ru_maxrss would include this process's.
    result.setdefault("peak_rss_mb", None)
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    result["log"] = str(log_path)
    return result


def make_entry(spec: ArtifactSpec, result: dict[str, Any], target: Target, *, base: Path | None = None) -> Entry:
    """The results.json entry of one artifact: what the spec says about it, and what its worker measured (when it succeeded)."""
    ok = result.get("status") == "ok"
    size = spec.size_bytes if spec.size_bytes is not None else (_model_size(spec.path) if spec.path.exists() else None)
    path = str(spec.path)
    if base is not None:
        try:
            path = spec.path.resolve().relative_to(base).as_posix()
        except ValueError:
            pass
    measured = {k: result[k] for k in MEASURED_KEYS if k in result and (ok or k in ("peak_rss_mb", "wall_seconds"))}
    entry = Entry(
        name=spec.name,
        format=spec.format,
        quant=spec.quant,
        path=path,
        size_bytes=size,
        status="ok" if ok else "failed",
        reference=spec.reference,
        gate_passed=spec.gate_passed,
        error=None if ok else str(result.get("error", "unknown error")),
        **measured,
    )
    if ok and spec.reference and result.get("n_examples"):
        entry.top1_agreement, entry.kl = 1.0, 0.0  # the reference against itself
    entry.fits = fits(size, entry.peak_rss_mb, target) if ok else None
    return entry


def bench_specs(
    specs: Sequence[ArtifactSpec],
    target: Target,
    *,
    work_dir: Path,
    examples: Sequence[dict[str, Any]],
    task: str,
    max_new_tokens: int | None,
    speed_messages: Sequence[dict[str, str]],
    speed: SpeedConfig,
    base: Path | None = None,
    command: Callable[[Path, Path], list[str]] | None = None,
    generate: int = 0,
    general_in: Path | None = None,
) -> tuple[list[Entry], dict[str, list[dict[str, Any]]]]:
    """Bench each artifact in its own process; returns the entries and each artifact's predictions.

    ``generate``: greedy answers to the first N examples (chat data); ``general_in``: the base
    model's general-set file (``bench_base``) to measure drift from base against.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    ref_file = work_dir / "reference-topk.npz"
    ref_file.unlink(missing_ok=True)
    entries: list[Entry] = []
    predictions: dict[str, list[dict[str, Any]]] = {}
    speed_job = SpeedJob(list(speed_messages), speed.decode_tokens, speed.repeats, speed.warmup)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as progress:
        bar = progress.add_task("bench", total=len(specs))
        for i, spec in enumerate(specs, 1):
            progress.update(bar, description=f"bench {i}/{len(specs)}: {spec.name}")
            job = BenchJob(
                name=spec.name,
                path=str(spec.path),
                target=target,
                load=spec.load,
                examples=list(examples),
                task=task,
                max_new_tokens=max_new_tokens,
                speed=speed_job,
                reference_out=str(ref_file) if spec.reference and examples else None,
                reference_in=str(ref_file) if not spec.reference and ref_file.is_file() else None,
                generate=generate,
                general_in=str(general_in) if general_in is not None else None,
            )
            result = run_worker(job, work_dir, command=command)
            if result.get("status") == "ok":
                result.update(task_figures(result))
            entry = make_entry(spec, result, target, base=base)
            entries.append(entry)
            predictions[spec.name] = result.get("predictions") or []
            if entry.ok:
                phases = {"load": entry.load_seconds or 0.0, **(entry.phase_seconds or {})}
                log.info(
                    "%s: accuracy %s, decode %.1f tok/s (%.0f s: %s)",
                    spec.name,
                    _fmt(entry.accuracy),
                    entry.decode_tok_s or 0.0,
                    entry.wall_seconds or 0,
                    ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()),
                )
            else:
                log.warning("%s: failed: %s", spec.name, entry.error)
            progress.advance(bar)
    return entries, predictions


def task_figures(result: dict[str, Any]) -> dict[str, Any]:
    """F1, bootstrap intervals and chrF from a worker's raw pairs (computed here, in the parent, for every artifact alike)."""
    from ftedge.bench import generative, metrics

    out: dict[str, Any] = {}
    pairs = [(p["target"], p["answer"]) for p in result.get("predictions") or []]
    if pairs:
        figures = metrics.classification(pairs)
        out.update({k: figures[k] for k in ("accuracy_ci", "macro_f1", "per_label", "confusions")})
    if result.get("nll"):
        out["perplexity_ci"] = metrics.perplexity_interval(result["nll"])
    if result.get("generations"):
        out.update(generative.score(result["generations"]))
    return out


def bench_base(
    recipe: Any, target: Target, work_dir: Path, *, command: Callable[[Path, Path], list[str]] | None = None
) -> tuple[DriftBase, Path | None]:
    """Run the untuned base model on the general set in its own worker (for drift from base): its summary for results.json,
    and the base's general-set file the artifacts' workers compare with (None when it failed).

    A base that cannot be resolved or run is a warning (no drift figures), not a failed bench.
    """
    from ftedge.bench import forgetting
    from ftedge.loader import resolve_base_model

    general = forgetting.load_general(recipe.eval.general_prompts)
    info: dict[str, Any] = {"model": str(recipe.base_model), "sources": general.sources}
    try:
        base = resolve_base_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code)
    except FtedgeError as err:
        log.warning("drift from base skipped: %s", err.one_line())
        return DriftBase(**info, status="failed", error=err.one_line()), None
    out = work_dir / "base-general.npz"
    out.unlink(missing_ok=True)
    job = BenchJob(
        name="base",
        path=str(base),
        target=target,
        load={"kind": "torch", "trust_remote_code": recipe.trust_remote_code},
        general=general.as_job(),
        general_out=str(out),
    )
    log.info("drift from base: the untuned base on %d general prompts and %d texts", len(general.prompts), len(general.texts))
    result = run_worker(job, work_dir, command=command)
    if result.get("status") != "ok" or not out.is_file():
        log.warning("drift from base skipped: the base model failed (%s)", result.get("error"))
        return DriftBase(**info, status="failed", error=str(result.get("error", "no output"))), None
    keys = ("general_prompts", "written_answers", "general_texts", "answer_tokens", "general_ppl", "wall_seconds")
    return DriftBase(**info, status="ok", **{k: result.get(k) for k in keys}), out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _host() -> HostInfo:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return HostInfo(cpu=cpu, cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version())


def results_doc(
    subject: Path,
    target: Target,
    entries: list[Entry],
    *,
    task: str | None,
    n_examples: int,
    max_new_tokens: int | None,
    speed: SpeedConfig,
    prompt_tokens: int | None,
    split: str | None = None,
    n_available: int | None = None,
    predictions: dict[str, list[dict[str, Any]]] | None = None,
) -> BenchResults:
    """results.json (``ftedge.results``). ``eval.split``: ``test`` (a run's test split) or ``file`` (``--data``); ``eval.max_new_tokens``:
    the answer budget used (the longest answer + slack, capped by ``eval.max_new_tokens_cap``); ``predictions``: every
    scored row's answer per artifact, in the order of the rows."""
    budget = next((e.max_new_tokens for e in entries if e.max_new_tokens), None)
    return BenchResults(
        ftedge_version=__version__,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        subject=str(subject),
        target=TargetInfo.of(target),
        eval=EvalInfo(
            task=task, n_examples=n_examples, max_new_tokens=budget, max_new_tokens_cap=max_new_tokens, split=split, n_available=n_available
        ),
        speed=SpeedInfo(prompt_tokens=prompt_tokens, decode_tokens=speed.decode_tokens, repeats=speed.repeats, warmup=speed.warmup),
        reference=next((e.name for e in entries if e.reference), None),
        host=_host(),
        artifacts=entries,
        predictions=predictions,
    )


def _prompt_tokens(entries: list[Entry]) -> int | None:
    return next((e.prompt_tokens for e in entries if e.prompt_tokens), None)


# -- public API ------------------------------------------------------------------
def bench_run(
    run: Run,
    target: Target,
    *,
    json_path: Path | None = None,
    speed: SpeedConfig | None = None,
    command: Callable[[Path, Path], list[str]] | None = None,
) -> BenchResults:
    """Bench every artifact of a run; write bench/results.json, report.md, plot.png; print the table."""
    from ftedge.bench import report

    speed = speed or SpeedConfig()
    specs = run_specs(run)
    recipe = run.recipe()
    out_dir = run.path / "bench"
    examples, n_test = run_examples(run)  # refused in one line if the data file changed since training
    with run.stage("bench") as metrics:
        if not examples:
            raise FtedgeError(f"no test rows for {run.path}", hint="set data.test or data.test_fraction > 0 in the recipe")
        log.info("bench: %d of the %d test rows", len(examples), n_test)
        warn_unlearned_labels(run, examples, "the test rows")
        task = recipe.eval.task
        drift_base, general_in = bench_base(recipe, target, out_dir / "work", command=command) if recipe.eval.drift else (None, None)
        entries, predictions = bench_specs(
            specs,
            target,
            work_dir=out_dir / "work",
            examples=examples,
            task=task,
            max_new_tokens=recipe.eval.max_new_tokens,
            speed_messages=examples[0]["messages"],
            speed=speed,
            base=run.path,
            command=command,
            generate=recipe.eval.generate if recipe.data.format != "text_label" else 0,
            general_in=general_in,
        )
        doc = results_doc(
            run.path,
            target,
            entries,
            task=task,
            n_examples=len(examples),
            max_new_tokens=recipe.eval.max_new_tokens,
            speed=speed,
            prompt_tokens=_prompt_tokens(entries),
            split="test",
            n_available=n_test,
            predictions=predictions,
        )
        doc.drift_base = drift_base
        if target.ship == "auto":
            from ftedge.choose import ship_decision

            doc.ship_decision = ship_decision(doc, target)
        paths = report.write_reports(doc, out_dir, predictions=predictions)
        if json_path is not None:
            write_results(doc, Path(json_path))
        report.print_table(doc)
        failed = [e.name for e in entries if not e.ok]
        metrics.update(artifacts=len(entries), failed=failed, target=target.name, n_examples=len(examples))
        for key, path in paths.items():
            run.record_artifact(f"bench-{key}", path, stage="bench")
        if len(failed) == len(entries):
            raise FtedgeError(f"every artifact failed to bench ({entries[0].error})", hint=f"see the logs in {out_dir / 'work'}")
    return doc


def bench_artifact(
    path: Path,
    target: Target,
    *,
    json_path: Path | None = None,
    data: Path | None = None,
    recipe: Path | None = None,
    overrides: Sequence[str] = (),
    speed: SpeedConfig | None = None,
) -> BenchResults:
    """Bench one standalone .gguf or ORT GenAI folder: speed, plus accuracy/perplexity on every row of ``data``.

    ``data`` is read in ``recipe``'s data format (its fields and system prompt), else as a text,label file, with
    ``data.KEY=VALUE`` / ``eval.KEY=VALUE`` ``overrides`` (e.g. ``data.system_prompt=...``, ``eval.task=perplexity``).
    """
    from ftedge.bench import report

    speed = speed or SpeedConfig()
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":  # a missing or truncated file is one line here, not a crash in the worker
        from ftedge.formats.gguf import inspect_gguf

        quant = inspect_gguf(path).quant
    elif fmt == "onnx":
        from ftedge.backends.ortgenai import read_genai_config

        read_genai_config(path)
        quant = _onnx_precision(path)
    else:
        quant = _hf_dtype(path)
    examples: list[dict[str, Any]] = []
    task, cap = None, None
    if data is not None:
        from ftedge.recipe import load_recipe

        cfg, ev = data_file_config(data, recipe=load_recipe(recipe, check_files=False) if recipe else None, overrides=overrides)
        examples = data_file_examples(data, cfg)
        task, cap = ev.task, ev.max_new_tokens
        if cfg.system_prompt is None and not any(m["role"] == "system" for ex in examples for m in ex["messages"]):
            log.info(
                "scoring %s without a system prompt: pass -o data.system_prompt=... (or --recipe) if the model was tuned with one", data
            )
        from ftedge.manifest import find_run

        trained_in = find_run(path)
        if trained_in is not None:
            warn_unlearned_labels(trained_in, examples, f"bench data {data}")
    elif recipe or overrides:
        raise FtedgeError("--recipe and -o only say how to read --data", hint="add --data FILE")
    spec = ArtifactSpec(path.stem if path.is_file() else path.name, fmt, quant, path.resolve())
    messages = examples[0]["messages"] if examples else [{"role": "user", "content": DEFAULT_SPEED_PROMPT}]
    with tempfile.TemporaryDirectory(prefix="ftedge-bench-") as tmp:
        entries, predictions = bench_specs(
            [spec],
            target,
            work_dir=Path(tmp),
            examples=examples,
            task=task or "label_match",
            max_new_tokens=cap,
            speed_messages=messages,
            speed=speed,
        )
        if not entries[0].ok:
            raise FtedgeError(f"bench of {path} failed: {entries[0].error}")
    doc = results_doc(
        path.resolve(),
        target,
        entries,
        task=task,
        n_examples=len(examples),
        max_new_tokens=cap,
        speed=speed,
        prompt_tokens=_prompt_tokens(entries),
        split="file" if data is not None else None,
        n_available=len(examples) if data is not None else None,
        predictions=predictions if data is not None else None,
    )
    if data is not None:
        doc.eval.data = str(Path(data).resolve())
    if json_path is not None:
        write_results(doc, Path(json_path))
    report.print_table(doc)
    return doc


def warn_unlearned_labels(run: Run, examples: Sequence[dict[str, Any]], what: str) -> list[str]:
    """Warn (and return the warnings) when the labels scored are ones the run's model never saw in training."""
    from ftedge.data.splits import label_warnings, run_splits

    recipe = run.recipe()
    if recipe.data.format != "text_label":
        return []
    try:
        train = [e.target for e in run_splits(run).train]
    except FtedgeError:  # the training data changed or moved since: nothing to compare with
        return []
    warnings = label_warnings(train, [str(e["target"]) for e in examples], what)
    for warning in warnings:
        log.warning(warning)
    return warnings


# -- standalone artifact labels ---------------------------------------------------
def _onnx_precision(path: Path) -> str | None:
    """The precision an ftedge ONNX folder is named after (``onnx/int4``), None for other names."""
    from ftedge.formats.quants import ONNX_PRECISIONS

    name = path.name.lower()
    return next((p for p in sorted(ONNX_PRECISIONS, key=len, reverse=True) if p in name), None)
