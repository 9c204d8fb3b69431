"""One artifact's bench, run in its own process: ``python -m ftedge.bench.worker JOB.json RESULT.json``.

The parent (``ftedge.bench.stage``) writes a job (artifact, how to load it, held-out examples, speed
settings, the reference's parity file) and reads the result; a runtime that crashes the process
loses only its own entry, and the peak RSS it reports is the artifact's own.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.backends.base import Backend
from ftedge.bench.job import BenchJob
from ftedge.bench.measures import measure_quality, measure_speed
from ftedge.errors import FtedgeError
from ftedge.logs import quiet_third_party
from ftedge.memory import peak_rss_mb

log = logging.getLogger(__name__)


# -- the worker ------------------------------------------------------------------
def open_backend(job: BenchJob) -> Backend:
    load = dict(job.load)
    if load.pop("kind", "auto") == "torch":
        from ftedge.backends.torch import TorchBackend

        return TorchBackend(job.path, threads=job.threads, **load)
    from ftedge.backends import load_backend, runtime_options

    options = runtime_options(job.path, job.target.runtime)
    return load_backend(job.path, threads=job.threads, n_ctx=job.n_ctx, **options, **load)


def run_job(job: BenchJob) -> dict[str, Any]:
    """Load the artifact; measure quality (if examples), greedy answers (``generate``), drift from base or the
    base's own general replies (``general_in`` / ``general_out``) and speed (``speed``); return the metrics."""
    from ftedge.bench import forgetting, generative

    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    phases: dict[str, float] = {}  # wall seconds of each measurement, for results.json and the log line

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = round(time.perf_counter() - t0, 3)

    backend = open_backend(job)
    n_ctx = job.n_ctx
    try:
        result["load_seconds"] = round(time.perf_counter() - started, 3)
        result["runtime"] = backend.settings
        examples = job.examples
        if examples:
            with phase("quality"):
                result.update(
                    measure_quality(
                        backend,
                        examples,
                        task=job.task,
                        max_new_tokens=job.max_new_tokens,
                        n_ctx=n_ctx,
                        reference_in=Path(job.reference_in) if job.reference_in else None,
                        reference_out=Path(job.reference_out) if job.reference_out else None,
                    )
                )
        if examples and job.generate:
            with phase("generate"):
                result["generations"] = generative.answers(backend, examples[: job.generate], n_ctx=n_ctx)
        if job.general_out:
            with phase("drift"):
                result.update(forgetting.base_reference(backend, job.general or {}, Path(job.general_out), n_ctx=n_ctx))
        elif job.general_in and Path(job.general_in).is_file():
            with phase("drift"):
                result.update(forgetting.drift(backend, Path(job.general_in)))
        speed = job.speed
        if speed is not None:
            with phase("speed"):
                result.update(
                    measure_speed(backend, speed.messages, decode_tokens=speed.decode_tokens, repeats=speed.repeats, warmup=speed.warmup)
                )
    finally:
        backend.close()
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["phase_seconds"] = phases
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ftedge.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    job: BenchJob | None = None
    try:
        job = BenchJob.read(Path(args[0]))
        result = run_job(job)
        code = 0
    except FtedgeError as err:
        result, code = {"status": "failed", "error": err.one_line()}, 1
    except Exception as err:  # any runtime error becomes this artifact's failed entry
        log.exception("bench of %s failed", job.path if job is not None else args[0])
        result, code = {"status": "failed", "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}, 1
    result["peak_rss_mb"] = peak_rss_mb()
    atomic.write_json(Path(args[1]), result)
    return code


if __name__ == "__main__":
    sys.exit(main())
