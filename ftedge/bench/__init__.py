"""The bench stage (``ftedge bench``): ``stage`` (what to bench, one worker process per artifact),
``job`` (the worker's typed job), ``worker`` (the child process), ``measures`` (quality and speed on an
opened backend), ``report`` (table, report.md, plot.png; results.json's schema is ``ftedge.results``)."""

from ftedge.bench.stage import bench_artifact, bench_run

__all__ = ["bench_artifact", "bench_run"]
