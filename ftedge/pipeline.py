"""`ftedge run`: train -> merge -> export -> bench -> ship, resumable at the first unfinished stage."""

from __future__ import annotations

import logging
import time

from ftedge.errors import GateFailedError
from ftedge.run import Run
from ftedge.targets import load_target

log = logging.getLogger(__name__)


def run_pipeline(run: Run, *, resumed: bool = False) -> None:
    """Run every stage not yet done; a parity-gate failure still benches and ships what passed, then fails."""
    from ftedge.bench import bench_run
    from ftedge.export import export_stage
    from ftedge.merge import merge_stage
    from ftedge.ship import ship_stage
    from ftedge.train import train_stage

    recipe = run.recipe()
    target = load_target(recipe.export.target)
    started = time.time()
    gate_error: GateFailedError | None = None

    steps = [
        ("train", lambda: train_stage(run, resume=resumed)),
        ("merge", lambda: merge_stage(run)),
        ("export", lambda: export_stage(run, target)),
        ("bench", lambda: bench_run(run, target)),
    ]
    for name, call in steps:
        if run.is_done(name):
            log.info("[%s] already done: skipped", name)
            continue
        log.info("[%s] starting", name)
        try:
            call()
        except GateFailedError as err:  # keep going with the artifacts that passed
            log.error("[%s] %s", name, err.one_line())
            gate_error = err
    ship = ship_stage(run, target)
    log.info("ship bundle: %s", ship)
    log.info("run finished in %.1f min: %s", (time.time() - started) / 60, run.path)
    if gate_error is not None:
        raise gate_error
