"""Run folders and their manifest: the only way stages learn what their predecessors made.

A run is ``runs/<recipe-name>-<UTC timestamp>/`` holding the frozen ``recipe.yaml`` and
``manifest.json``: per-stage status and timings, and every finished artifact with its
size and sha256. The manifest is rewritten atomically under a file lock; an artifact is
recorded only once it is complete.

One process at a time works on a run: every stage (and run creation) holds an exclusive lock on
the run folder's ``.run.lock`` for its whole duration (``Run.lock``); a second process is refused
in one line naming the holder's pid. The lock is an ``flock``, so it dies with its process: a
stale lock never blocks anyone. A stage left ``running`` by a process that is gone (killed) is
marked ``interrupted`` by the next command that opens the run.

Stages read artifacts through :class:`Artifact` (a typed view of a manifest entry: its format,
quant type and parity-gate verdict) and the queries of :class:`Run` (``models()``,
``usable_models()``, ``artifact()``, ``stage_record()``, ``stage_metrics()``, ``target_name()``), never by parsing
keys or entries themselves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge import __version__, atomic
from ftedge.errors import FtedgeError, StageMissingError, from_os_error
from ftedge.recipe import Recipe, dump_recipe, load_recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
SCHEMA = 1
STAGES = ("train", "merge", "export", "bench", "ship")
MODEL_FORMATS = ("hf", "gguf", "onnx")  # artifacts a runtime can load (an adapter is not one)
MODEL_STAGES = ("merge", "export")
LOCK = ".run.lock"  # held (flock) by the one process working on the run; holds its pid and stage
# How another process's work on a run is named: "RUN is being trained by another process (pid N)".
DOING = {"create": "created", "train": "trained", "merge": "merged", "export": "exported", "bench": "benchmarked", "ship": "shipped"}

# Runs this process holds the lock of: run path -> [open lock file, nesting depth].
_HELD: dict[Path, list[Any]] = {}


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
    def size_bytes(self) -> int | None:
        size = self.entry.get("size_bytes")
        return size if isinstance(size, int) else None

    @property
    def source(self) -> str | None:
        """The artifact this one was made from or holds (a Modelfile's GGUF, ship/'s model), when recorded."""
        return self.entry.get("source")

    @property
    def mode(self) -> str | None:
        """How a merged model was written (``float`` / ``dequantized``: the recipe's ``export.merge_into``), when recorded."""
        return self.entry.get("mode")

    @property
    def is_model(self) -> bool:
        return self.format in MODEL_FORMATS and self.stage in MODEL_STAGES

    @property
    def usable(self) -> bool:
        """On disk and not failed at its gate: fit to chat with, bench or ship."""
        return self.path.exists() and self.gate_passed is not False


@dataclass(frozen=True)
class StageRecord:
    """A stage's entry in the manifest, typed."""

    name: str
    status: str  # pending, running, done, failed, interrupted
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Run:
    """A run folder; all manifest reads and writes go through here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    # -- creation / opening -------------------------------------------------
    @classmethod
    def create(cls, recipe: Recipe, *, runs_root: Path | str = "runs", run_dir: Path | str | None = None, force: bool = False) -> Run:
        """Make a new run folder with the frozen recipe and an empty manifest, under the run's lock.

        A folder that already holds a run is refused, or with ``force`` emptied and reused (unless
        another process is working on it).
        """
        try:
            if run_dir is None:
                run_dir = _new_folder(Path(runs_root), recipe.name)
            else:
                run_dir = Path(run_dir)
                cls.check_new_folder(run_dir, force=force)
                run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise from_os_error(err, run_dir or runs_root) from None
        run = cls(run_dir)
        with run.lock("create"):
            cls.check_new_folder(run.path, force=force)  # again, under the lock: another process may have been first
            if run.manifest_path.exists():
                log.warning("--force: replacing the run in %s", run.path)
                run._clear()
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
    def check_new_folder(cls, run_dir: Path, *, force: bool = False) -> None:
        """Refuse a --run-dir that is a file, or that holds a run already (unless ``force`` replaces it)."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise FtedgeError(f"--run-dir {run_dir} is a file, not a folder", hint="pick another --run-dir")
        if (run_dir / MANIFEST).exists() and not force:
            raise FtedgeError(
                f"{run_dir} already holds a run{cls(run_dir)._state_note()}",
                hint=f"continue it with `--resume {run_dir}`, replace it with `--force`, or pick another --run-dir",
            )

    def _state_note(self) -> str:
        """`` (train failed: ...)``: what the existing run's first unfinished stage says, for messages."""
        try:
            stages = self.manifest().get("stages", {})
        except FtedgeError:
            return " (its manifest is damaged)"
        for name in STAGES:
            st = stages.get(name, {})
            if st.get("status") != "done":
                error = f": {st['error']}" if st.get("error") else ""
                return f" ({name} {st.get('status', 'pending')}{error})"[:400]
        return " (finished)"

    def _clear(self) -> None:
        """Remove everything in the run folder but its lock (held by this process)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @classmethod
    def open(cls, path: Path | str) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise FtedgeError(f"run folder {path} not found", hint="give a folder under runs/ made by `ftedge train` or `ftedge run`")
        run = cls(path)
        if not run.manifest_path.is_file():
            raise FtedgeError(f"{path} is not an ftedge run (no {MANIFEST})", hint="give a folder made by `ftedge train` or `ftedge run`")
        run.manifest()  # parse check
        run.mark_interrupted()
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

    # -- one process at a time --------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold the run's exclusive lock while ``stage`` works on it; refuse if another process holds it.

        Re-entrant within a process (a command may take it before the stage it runs takes it again).
        """
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            with contextlib.suppress(OSError):  # only informs a refused process of the stage now running
                _write_holder(held[0], stage)
            try:
                yield
            finally:
                held[1] -= 1
            return
        lock_path = self.path / LOCK
        try:
            fh = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 -- held until the with-block ends
        except OSError as err:
            raise from_os_error(
                err, lock_path, hint=f"ftedge writes into the run folder {self.path}: make it writable, or copy the run to a writable disk"
            ) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fh)
            fh.close()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise from_os_error(err, lock_path, action="lock") from None
            doing = DOING.get(str(holder.get("stage")), "used")
            pid = holder.get("pid")
            if pid is None:  # the holder has the lock but has not written its pid yet: it has only just started
                raise FtedgeError(
                    f"{self.path} is being used by another process (it has just started)",
                    hint="wait for it to finish, then run the command again",
                ) from None
            raise FtedgeError(
                f"{self.path} is being {doing} by another process (pid {pid})",
                hint=f"wait for it to finish, or stop it (kill {pid}) and run the command again",
            ) from None
        try:
            _write_holder(fh, stage)
        except OSError as err:
            fh.close()
            raise from_os_error(err, lock_path) from None
        _HELD[self.path] = [fh, 1]
        try:
            yield
        finally:
            del _HELD[self.path]
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def mark_interrupted(self) -> list[str]:
        """Stages left ``running`` by a process of this host that is gone become ``interrupted``; returns them."""
        if self.path in _HELD:
            return []
        stale = [name for name, st in self.manifest().get("stages", {}).items() if _is_stale(st)]
        if not stale:
            return []

        def _mark(m: dict[str, Any]) -> None:
            for name in stale:
                st = m["stages"][name]
                if _is_stale(st):
                    st.update(status="interrupted", error=f"the process running it (pid {st.get('pid')}) ended before it finished")

        try:
            self.update(_mark)
        except OSError:  # a read-only run can still be read
            return stale
        for name in stale:
            log.warning("%s: the %s stage was interrupted (its process is gone); run it again to redo it", self.path, name)
        return stale

    # -- stages -------------------------------------------------------------
    def stage_record(self, stage: str) -> StageRecord:
        """A stage's record (status, timings, error, metrics); ``pending`` when it never ran."""
        st = self.manifest().get("stages", {}).get(stage) or {}
        metrics = st.get("metrics")
        return StageRecord(
            name=stage,
            status=str(st.get("status", "pending")),
            started=st.get("started"),
            finished=st.get("finished"),
            seconds=st.get("seconds"),
            error=st.get("error"),
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
        )

    def stage_metrics(self, stage: str) -> dict[str, Any]:
        """The metrics a stage recorded (train: steps, best_eval_loss, ...; export: target, artifacts; ...); {} when none."""
        return self.stage_record(stage).metrics

    def target_name(self) -> str | None:
        """The target profile the run was exported for (export's record), else the recipe's ``export.target``."""
        name = self.stage_metrics("export").get("target")
        if isinstance(name, str):
            return name
        try:
            return self.recipe().export.target
        except FtedgeError:
            return None

    def stage_status(self, stage: str) -> str:
        return self.stage_record(stage).status

    def is_done(self, stage: str) -> bool:
        return self.stage_status(stage) == "done"

    def require(self, stage: str, what: str, command: str) -> None:
        """Refuse with an actionable message unless ``stage`` finished."""
        if not self.is_done(stage):
            raise StageMissingError(f"no {what} in {self.path}", hint=f"run `{command} {self.path}` first")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Hold the run's lock and mark a stage running; done (with seconds) on success, failed (with the error) otherwise.

        Yields a dict of metrics that is stored with the stage. An OSError a user can cause (no space,
        read-only, no permission) is raised, and recorded, as one line naming its path.
        """
        with self.lock(name):
            metrics: dict[str, Any] = {}
            started = time.time()

            def _start(m: dict[str, Any]) -> None:
                m.setdefault("stages", {})[name] = {"status": "running", "started": utc_now(), "pid": os.getpid(), "host": _HOST}

            self.update(_start)
            try:
                yield metrics
            except BaseException as err:
                raised: BaseException = from_os_error(err, action="access") if isinstance(err, OSError) else err
                reason = "interrupted" if isinstance(err, KeyboardInterrupt) else (str(raised) or type(raised).__name__)

                def _fail(m: dict[str, Any]) -> None:
                    st = m["stages"][name]
                    st.update(status="failed", finished=utc_now(), seconds=round(time.time() - started, 2), error=reason[:2000])
                    if metrics:
                        st["metrics"] = metrics

                try:
                    self.update(_fail)
                except OSError as update_err:  # the disk that failed the stage may fail this too
                    log.warning("could not record the failure in %s (%s)", self.manifest_path, update_err)
                if raised is err:
                    raise
                raise raised from None

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
        from ftedge.loader import resolve_base_model

        return resolve_base_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code)

    def rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.path).as_posix()
        except ValueError:
            return str(path)


_HOST = socket.gethostname()


def _new_folder(runs_root: Path, name: str) -> Path:
    """Claim a fresh ``runs_root/<name>-<UTC time>[-n]`` folder (mkdir is atomic: two processes never share one)."""
    runs_root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = runs_root / (f"{name}-{stamp}" if n == 0 else f"{name}-{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FtedgeError(f"cannot find a free run folder name in {runs_root}", hint="pass --run-dir")


def _write_holder(fh: Any, stage: str) -> None:
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": _HOST, "stage": stage}))
    fh.flush()


def _read_holder(fh: Any) -> dict[str, Any]:
    try:
        fh.seek(0)
        holder = json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(st: dict[str, Any]) -> bool:
    """A ``running`` stage whose process (recorded pid, this host) no longer exists."""
    if st.get("status") != "running" or st.get("host", _HOST) != _HOST or not isinstance(st.get("pid"), int):
        return False
    try:
        os.kill(st["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
        from ftedge.loader import resolve_base_model

        return resolve_base_model(source)
    if this is not None and source.path == this.path:
        raise FtedgeError(f"train.init_from names the run itself ({this.path})", hint="name the earlier (SFT) run")
    merged = source.artifact("merged")
    if merged is None or not merged.path.is_dir():
        raise StageMissingError(
            f"train.init_from: run {source.path} has no merged model", hint=f"run `ftedge merge {source.path}` first (ftedge run does it)"
        )
    return merged.path
