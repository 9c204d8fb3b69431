"""Run folders and their manifest.

A run is ``runs/<recipe-name>-<UTC timestamp>/`` holding the frozen ``recipe.yaml`` and
``manifest.json``: per-stage status and timings, and every finished artifact with its
size and sha256. The manifest is rewritten atomically under a file lock; an artifact is
recorded only once it is complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftedge import __version__, atomic
from ftedge.errors import FtedgeError, StageMissingError
from ftedge.recipe import Recipe, dump_recipe, load_recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
SCHEMA = 1
STAGES = ("train", "merge", "export", "bench")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Run:
    """A run folder; all manifest reads and writes go through here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    # -- creation / opening -------------------------------------------------
    @classmethod
    def create(cls, recipe: Recipe, *, runs_root: Path | str = "runs", run_dir: Path | str | None = None) -> Run:
        """Make a new run folder with the frozen recipe and an empty manifest."""
        if run_dir is None:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
            run_dir = Path(runs_root) / f"{recipe.name}-{stamp}"
            n = 1
            while Path(run_dir).exists():
                run_dir = Path(runs_root) / f"{recipe.name}-{stamp}-{n}"
                n += 1
        run_dir = Path(run_dir)
        if (run_dir / MANIFEST).exists():
            raise FtedgeError(f"{run_dir} already holds a run", hint=f"use `--resume {run_dir}` or pick another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        run = cls(run_dir)
        atomic.write_text(run.path / RECIPE, dump_recipe(recipe))
        atomic.write_json(
            run.manifest_path,
            {
                "schema": SCHEMA,
                "ftedge_version": __version__,
                "name": recipe.name,
                "created": utc_now(),
                "recipe": RECIPE,
                "stages": {s: {"status": "pending"} for s in STAGES},
                "artifacts": {},
            },
        )
        log.info("created run %s", run.path)
        return run

    @classmethod
    def open(cls, path: Path | str) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise FtedgeError(f"run folder {path} not found", hint="give a folder under runs/ made by `ftedge train` or `ftedge run`")
        run = cls(path)
        if not run.manifest_path.is_file():
            raise FtedgeError(f"{path} is not an ftedge run (no {MANIFEST})", hint="give a folder made by `ftedge train` or `ftedge run`")
        run.manifest()  # parse check
        return run

    # -- manifest -----------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise FtedgeError(f"{self.manifest_path} cannot be read ({err})", hint="the run folder is damaged; start a new run") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        lock_path = self.path / ".manifest.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.manifest()
                yield data
                atomic.write_json(self.manifest_path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, fn: Any) -> dict[str, Any]:
        """Apply ``fn(manifest_dict)`` under the lock and write the result atomically."""
        with self._locked() as data:
            fn(data)
        return data

    def recipe(self) -> Recipe:
        return load_recipe(self.path / RECIPE, check_files=False)

    # -- stages -------------------------------------------------------------
    def stage_status(self, stage: str) -> str:
        return self.manifest().get("stages", {}).get(stage, {}).get("status", "pending")

    def is_done(self, stage: str) -> bool:
        return self.stage_status(stage) == "done"

    def require(self, stage: str, what: str, command: str) -> None:
        """Refuse with an actionable message unless ``stage`` finished."""
        if not self.is_done(stage):
            raise StageMissingError(f"no {what} in {self.path}", hint=f"run `{command} {self.path}` first")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Mark a stage running; done (with seconds) on success, failed (with the error) otherwise.

        Yields a dict of metrics that is stored with the stage.
        """
        metrics: dict[str, Any] = {}
        started = time.time()

        def _start(m: dict[str, Any]) -> None:
            m.setdefault("stages", {})[name] = {"status": "running", "started": utc_now()}

        self.update(_start)
        try:
            yield metrics
        except BaseException as err:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else (str(err) or type(err).__name__)

            def _fail(m: dict[str, Any]) -> None:
                st = m["stages"][name]
                st.update(status="failed", finished=utc_now(), seconds=round(time.time() - started, 2), error=reason[:2000])
                if metrics:
                    st["metrics"] = metrics

            self.update(_fail)
            raise

        def _done(m: dict[str, Any]) -> None:
            st = m["stages"][name]
            st.update(status="done", finished=utc_now(), seconds=round(time.time() - started, 2))
            if metrics:
                st["metrics"] = metrics

        self.update(_done)

    # -- artifacts ----------------------------------------------------------
    def record_artifact(self, key: str, path: Path, *, stage: str, **meta: Any) -> dict[str, Any]:
        """Record a complete artifact (file or folder) with its size and sha256."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(path)
        size, digest = atomic.digest_path(path)
        entry = {"path": self.rel(path), "stage": stage, "size_bytes": size, "sha256": digest, "recorded": utc_now(), **meta}

        def _add(m: dict[str, Any]) -> None:
            m.setdefault("artifacts", {})[key] = entry

        self.update(_add)
        return entry

    def set_artifact_fields(self, key: str, **fields: Any) -> None:
        def _set(m: dict[str, Any]) -> None:
            m["artifacts"][key].update(fields)

        self.update(_set)

    def drop_artifact(self, key: str) -> None:
        self.update(lambda m: m.get("artifacts", {}).pop(key, None))

    def artifacts(self, stage: str | None = None) -> dict[str, dict[str, Any]]:
        arts = self.manifest().get("artifacts", {})
        return {k: v for k, v in arts.items() if stage is None or v.get("stage") == stage}

    def artifact_path(self, key: str) -> Path:
        entry = self.manifest().get("artifacts", {}).get(key)
        if entry is None:
            raise StageMissingError(f"no artifact {key!r} in {self.path}")
        return self.path / entry["path"]

    def rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.path).as_posix()
        except ValueError:
            return str(path)
