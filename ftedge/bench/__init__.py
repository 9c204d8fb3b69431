"""The bench stage (``ftedge bench``): ``stage`` (what to bench, one worker process per artifact),
``worker`` (the child process), ``measures`` (quality and speed on an opened backend), ``report``
(table, results.json, report.md, plot.png)."""

from ftedge.bench.stage import bench_artifact, bench_run

__all__ = ["bench_artifact", "bench_run"]
