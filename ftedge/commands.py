"""What each command does: open or create the run, call the stage, handle resume, ranks and skips.

The CLI (``ftedge.cli``) parses and prints; everything else a command does is here. Stage
modules (train, merge, export, bench, ship) never import each other; they meet here and in the
run's manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ftedge.errors import FtedgeError, GateFailedError
from ftedge.manifest import MANIFEST, Run
from ftedge.targets import load_target

log = logging.getLogger(__name__)


def create_or_resume(
    recipe_path: Path | None, overrides: list[str], run_dir: Path | None, resume: Path | None, *, force: bool = False
) -> Run:
    """A new run from a recipe (checked before any model loads), or an existing one to resume.

    ``force`` replaces the run already in ``run_dir`` (e.g. one whose training failed on a bad recipe).
    """
    if resume is not None:
        if recipe_path is not None or overrides:
            raise FtedgeError("--resume continues a run with its frozen recipe", hint="drop the RECIPE and -o options, or start a new run")
        if force:
            raise FtedgeError("--force replaces a run and --resume continues one", hint="give one of them")
        return Run.open(resume)
    from ftedge.recipe import load_recipe
    from ftedge.validate import preflight

    if recipe_path is None:
        raise FtedgeError("give a RECIPE, or --resume RUN")
    if force and run_dir is None:
        raise FtedgeError("--force replaces the run in --run-dir", hint="give the --run-dir to replace, or drop --force")
    if run_dir is not None:
        Run.check_new_folder(run_dir, force=force)  # before the slower checks; Run.create checks again under the lock
    preflight(recipe_path, overrides)
    return Run.create(load_recipe(recipe_path, overrides), run_dir=run_dir, force=force)


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) set by `accelerate launch` / torchrun; (0, 1) when run directly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _wait_for_run(run_dir: Path, timeout: float = 600.0) -> Run:
    """Other ranks open the run folder rank 0 creates (after its preflight)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise FtedgeError(f"rank 0 did not create {run_dir} within {timeout:.0f} s", hint="see rank 0's error above")
        time.sleep(0.2)
    return Run.open(run_dir)


def train(
    recipe_path: Path | None, overrides: list[str], *, run_dir: Path | None = None, resume: Path | None = None, force: bool = False
) -> Run:
    from ftedge.train import train_stage

    rank, world = launcher_rank()
    if world > 1 and resume is None:
        # Every process must train into the same folder; only rank 0 creates it.
        if run_dir is None:
            raise FtedgeError(
                f"{world} training processes need one shared run folder",
                hint="pass --run-dir runs/NAME to `accelerate launch -m ftedge.cli train`",
            )
        run = create_or_resume(recipe_path, overrides, run_dir, None, force=force) if rank == 0 else _wait_for_run(Path(run_dir))
    else:
        run = create_or_resume(recipe_path, overrides, run_dir, resume, force=force)
    # Only rank 0 holds the run (and touches the manifest); the other ranks train beside it.
    with run.lock("train") if rank == 0 else contextlib.nullcontext():
        if world == 1:
            prepare_init(run)
        train_stage(run, resume=resume is not None, data_warnings=data_warnings)
    return run


def data_warnings(recipe: Any, tokenizer: Any, splits: Any) -> list[str]:
    """``ftedge data check``'s findings on the splits training uses, one line each: what the train stage logs first."""
    from ftedge.datacheck import check_data

    return check_data(recipe, tokenizer=tokenizer, splits=splits).warnings()


def prepare_init(run: Run) -> None:
    """``train.init_from`` naming another run whose adapter is not merged yet: merge it first (its merged model is the start)."""
    if run.is_done("train"):
        return
    spec = run.recipe().train.init_from
    if spec is None:
        return
    from ftedge.manifest import init_source

    source = init_source(spec)
    if isinstance(source, Run) and source.path != run.path and source.artifact("merged") is None:
        from ftedge.merge import merge_stage

        log.info("train.init_from: merging %s first", source.path)
        merge_stage(source)


def merge(run_dir: Path, *, into: str | None = None, force: bool = False) -> Path:
    from ftedge.merge import merge_stage

    run = Run.open(run_dir)
    with run.lock("merge"):
        return merge_stage(run, into=into, force=force)


def export(run_dir: Path, *, target: str | None = None, force: bool = False) -> None:
    from ftedge.export import export_stage

    run = Run.open(run_dir)
    with run.lock("export"):
        export_stage(run, load_target(target or run.recipe().export.target), force=force)


def bench(
    subject: Path,
    *,
    target: str | None = None,
    json_path: Path | None = None,
    data: Path | None = None,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
) -> None:
    from ftedge.bench import bench_artifact, bench_run

    if not subject.exists():
        raise FtedgeError(f"{subject} not found", hint="give a run folder, a .gguf file or an ORT GenAI folder")
    if subject.is_dir() and (subject / MANIFEST).is_file():
        if data is not None or recipe is not None or overrides:
            raise FtedgeError(
                "--data, --recipe and -o are for a standalone artifact", hint=f"a run is benched on its test split: ftedge bench {subject}"
            )
        run = Run.open(subject)
        with run.lock("bench"):
            bench_run(run, load_target(target or run.recipe().export.target), json_path=json_path)
    else:
        target_profile = load_target(target or "laptop-cpu")
        bench_artifact(subject, target_profile, json_path=json_path, data=data, recipe=recipe, overrides=overrides or [])


def ship(run_dir: Path, *, target: str | None = None, force: bool = False) -> Path:
    from ftedge.ship import ship_stage

    run = Run.open(run_dir)
    with run.lock("ship"):
        return ship_stage(run, load_target(target or run.recipe().export.target), force=force)


def chat(artifact: Path, *, prompt: str | None, system: str | None, max_new_tokens: int, threads: int | None) -> None:
    from ftedge.chat import chat_session

    chat_session(artifact, prompt=prompt, system=system, max_new_tokens=max_new_tokens, threads=threads)


def serve(artifact: Path, **options: Any) -> None:
    """``ftedge serve``: an OpenAI-compatible server (and chat page) on one artifact, until Ctrl-C."""
    from ftedge.serve import serve as run_server

    run_server(artifact, **options)


def data_check(recipe_path: Path, overrides: list[str], *, strict: bool = False, tokens: bool = True, emit: Any = None) -> Any:
    """``ftedge data check``: every data check of a recipe; ``emit(report)`` shows it; ``strict`` fails on leakage."""
    from ftedge.datacheck import check_data
    from ftedge.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = None
    if tokens:
        from ftedge.loader import load_tokenizer, resolve_base_model

        tokenizer = load_tokenizer(resolve_base_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code))
    report = check_data(recipe, tokenizer=tokenizer, source=str(recipe_path))
    if emit is not None:
        emit(report)
    unreadable, leakage = report.finding("unreadable"), report.finding("leakage")
    if unreadable is not None and unreadable.status == "error":
        raise FtedgeError(f"{recipe_path}: {unreadable.summary}", hint="fix the rows listed above")
    if strict and report.leakage and leakage is not None:
        raise FtedgeError(f"{recipe_path}: leakage: {leakage.summary}", hint="remove the shared rows from the validation/test data")
    return report


def data_preferences(run_dir: Path, *, out: Path | None = None, rows: int | None = None) -> dict[str, Any]:
    """``ftedge data preferences``: the run's mistakes on its training rows as preference pairs (merged first if needed)."""
    from ftedge.preferences import DEFAULT_ROWS, build_preferences

    run = Run.open(run_dir)
    run.require("train", "trained model", "ftedge train --resume")
    if run.artifact("merged") is None:
        from ftedge.merge import merge_stage
        from ftedge.recipe import require_mergeable

        require_mergeable(run.recipe(), "data preferences")
        log.info("data preferences: merging %s first (its merged model answers)", run.path)
        with run.lock("merge"):
            merge_stage(run)
    return build_preferences(run, out, rows=DEFAULT_ROWS if rows is None else rows)


def run_all(
    recipe_path: Path | None, overrides: list[str], *, run_dir: Path | None = None, resume: Path | None = None, force: bool = False
) -> Run:
    """train -> merge -> export -> bench -> ship; a resumed run continues at its first unfinished stage.

    A parity-gate failure still benches and ships what passed, then fails (exit 3).
    """
    run = create_or_resume(recipe_path, overrides, run_dir, resume, force=force)
    with run.lock("train"):  # held across the stages: no other process slips in between them
        return _run_stages(run, resume=resume is not None)


def _run_stages(run: Run, *, resume: bool) -> Run:
    from ftedge import eta
    from ftedge.bench import bench_run
    from ftedge.export import export_stage
    from ftedge.merge import merge_stage
    from ftedge.recipe import unmergeable_reason
    from ftedge.ship import ship_stage
    from ftedge.train import train_stage

    prepare_init(run)
    target = load_target(run.recipe().export.target)
    unmergeable = unmergeable_reason(run.recipe())  # prefix tuning: train and bench only
    started = time.time()
    gate_error: GateFailedError | None = None
    units = _stage_units(run, target)
    estimates = eta.estimate(units, eta.load_rates())
    done = {name for name in eta.STAGES if run.is_done(name)} | ({"merge", "export", "ship"} if unmergeable is not None else set())
    steps = [
        ("train", lambda: train_stage(run, resume=resume, eta_after=eta.remaining(estimates, done, "train"), data_warnings=data_warnings)),
        ("merge", lambda: merge_stage(run)),
        ("export", lambda: export_stage(run, target)),
        ("bench", lambda: bench_run(run, target)),
        ("ship", lambda: ship_stage(run, target)),
    ]
    for name, call in steps:
        if run.is_done(name):
            log.info("[%s] already done: skipped", name)
            continue
        if unmergeable is not None and name in ("merge", "export", "ship"):
            log.info("[%s] skipped: %s", name, unmergeable)
            continue
        log.info("[%s] starting (whole run: about %s left)", name, eta.clock(eta.remaining(estimates, done, name, estimates[name])))
        t0 = time.time()
        try:
            call()
        except GateFailedError as err:  # keep going with the artifacts that passed
            log.error("[%s] %s", name, err.one_line())
            gate_error = err
        eta.record(name, time.time() - t0, units[name])  # this machine's pace, for the next run's estimate
        done.add(name)
    if unmergeable is None:
        log.info("ship bundle: %s", run.path / "ship")
    log.info("run finished in %.1f min: %s", (time.time() - started) / 60, run.path)
    if gate_error is not None:
        raise gate_error
    return run


def _stage_units(run: Run, target: Any) -> dict[str, float]:
    """The work of each stage of the run, for the whole-run ETA (``ftedge.eta``)."""
    from ftedge import eta
    from ftedge.loader import resolve_base_model

    recipe = run.recipe()
    try:  # the train stage resolves it next (cached); its errors are the train stage's to report
        base_gb = eta.folder_gb(resolve_base_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code))
    except (FtedgeError, OSError):
        base_gb = 0.0
    return eta.stage_units(recipe, target, base_gb=base_gb or eta.REFERENCE_BASE_GB, steps=recipe.train.max_steps or 0)
