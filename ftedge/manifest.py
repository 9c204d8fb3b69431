"""Run folders and their manifest: the only way stages learn what their predecessors made.

A run is ``runs/<recipe-name>-<UTC timestamp>/`` holding the frozen ``recipe.yaml`` and
``manifest.json``: per-stage status and timings, and every finished artifact with its
size and sha256. The manifest is rewritten atomically under a file lock; an artifact is
recorded only once it is complete.

Stages read artifacts through :class:`Artifact` (a typed view of a manifest entry: its format,
quant type and parity-gate verdict) and the queries of :class:`Run` (``models()``,
``usable_models()``), never by parsing keys or entries themselves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftedge import __version__, atomic
from ftedge.errors import FtedgeError, StageMissingError
from ftedge.recipe import Recipe, dump_recipe, load_recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
SCHEMA = 1
STAGES = ("train", "merge", "export", "bench", "ship")
MODEL_FORMATS = ("hf", "gguf", "onnx")  # artifacts a runtime can load (an adapter is not one)
MODEL_STAGES = ("merge", "export")


@dataclass(frozen=True)
class Artifact:
    """A recorded artifact: a typed view of its manifest entry."""

    key: str
    path: Path  # absolute
    entry: dict[str, Any]

    @property
    def stage(self) -> str | None:
        return self.entry.get("stage")

    @property
    def format(self) -> str | None:
        """``hf``, ``gguf``, ``onnx``, ``peft`` (an adapter), ``bundle`` (ship/), ``ollama`` (a Modelfile), ..."""
        return self.entry.get("format")

    @property
    def quant(self) -> str | None:
        """The quant type or precision (``q4_k_m``, ``int4``, ``f16``) of a model artifact, when recorded."""
        return self.entry.get("quant")

    @property
    def gate(self) -> dict[str, Any] | None:
        gate = self.entry.get("gate")
        return gate if isinstance(gate, dict) else None

    @property
    def gate_passed(self) -> bool | None:
        """The export parity gate's verdict; None for an artifact that is not gated (merged, adapter, ...)."""
        gate = self.gate
        if gate is not None and isinstance(gate.get("passed"), bool):
            return gate["passed"]
        return None

    @property
    def is_model(self) -> bool:
        return self.format in MODEL_FORMATS and self.stage in MODEL_STAGES

    @property
    def usable(self) -> bool:
        """On disk and not failed at its gate: fit to chat with, bench or ship."""
        return self.path.exists() and self.gate_passed is not False


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
    def record_artifact(
        self, key: str, path: Path, *, stage: str, format: str | None = None, quant: str | None = None, **meta: Any
    ) -> dict[str, Any]:
        """Record a complete artifact (file or folder) with its size and sha256."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(path)
        size, digest = atomic.digest_path(path)
        typed = {k: v for k, v in (("format", format), ("quant", quant)) if v is not None}
        entry = {"path": self.rel(path), "stage": stage, "size_bytes": size, "sha256": digest, "recorded": utc_now(), **typed, **meta}

        def _add(m: dict[str, Any]) -> None:
            m.setdefault("artifacts", {})[key] = entry

        self.update(_add)
        return entry

    def artifacts(self, stage: str | None = None) -> dict[str, dict[str, Any]]:
        arts = self.manifest().get("artifacts", {})
        return {k: v for k, v in arts.items() if stage is None or v.get("stage") == stage}

    def artifact(self, key: str) -> Artifact | None:
        entry = self.manifest().get("artifacts", {}).get(key)
        return None if entry is None else Artifact(key, self.path / entry["path"], entry)

    def artifact_path(self, key: str) -> Path:
        art = self.artifact(key)
        if art is None:
            raise StageMissingError(f"no artifact {key!r} in {self.path}")
        return art.path

    def models(self, fmt: str | None = None) -> list[Artifact]:
        """Model artifacts (merged, GGUFs, ONNX folders) in recording order, optionally of one format."""
        arts = [Artifact(k, self.path / v["path"], v) for k, v in self.manifest().get("artifacts", {}).items()]
        return [a for a in arts if a.is_model and (fmt is None or a.format == fmt)]

    def usable_models(self, fmt: str | None = None) -> list[Artifact]:
        """Model artifacts on disk that did not fail their parity gate."""
        return [a for a in self.models(fmt) if a.usable]

    def base_model(self) -> Path:
        """The model the run's adapter trains (or trained) on: ``train.init_from``'s model, else the recipe's base model."""
        recipe = self.recipe()
        if recipe.train.init_from is not None:
            return init_model(recipe.train.init_from, this=self)
        from ftedge.hf import resolve_base_model

        return resolve_base_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code)

    def rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.path).as_posix()
        except ValueError:
            return str(path)


def find_run(path: Path) -> Run | None:
    """The run a path is or lives in (up to three folders up: ship/, gguf/, onnx/<variant>/), else None."""
    path = Path(path).resolve()
    for folder in [path, *list(path.parents)[:3]]:
        if folder.is_dir() and (folder / MANIFEST).is_file():
            return Run.open(folder)
    return None


def init_source(spec: str | Path) -> Run | Path:
    """What ``train.init_from`` names: a run (its folder, or a folder inside it such as adapter/), or a model folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FtedgeError(f"train.init_from: {path} not found", hint="give a run folder (e.g. runs/my-sft-run) or a merged model folder")
    run = find_run(path)
    if run is not None:
        return run
    if (path / "adapter_config.json").is_file():
        raise FtedgeError(
            f"train.init_from: {path} is an adapter outside a run folder",
            hint="give the run folder it was trained in, or a merged model folder (base + adapter, e.g. a run's merged/)",
        )
    return path


def init_model(spec: str | Path, *, this: Run | None = None) -> Path:
    """The model folder ``train.init_from`` starts from: a run's merged model, or the given model folder."""
    source = init_source(spec)
    if isinstance(source, Path):
        from ftedge.hf import resolve_base_model

        return resolve_base_model(source)
    if this is not None and source.path == this.path:
        raise FtedgeError(f"train.init_from names the run itself ({this.path})", hint="name the earlier (SFT) run")
    merged = source.artifact("merged")
    if merged is None or not merged.path.is_dir():
        raise StageMissingError(
            f"train.init_from: run {source.path} has no merged model", hint=f"run `ftedge merge {source.path}` first (ftedge run does it)"
        )
    return merged.path
