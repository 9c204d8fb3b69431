"""How long `ftedge run` has left: each stage's work in units, times seconds per unit.

Units: train = optimizer steps; merge = GB of base weights; export = GB x artifacts of the
target; bench = test rows x artifacts benched (the PyTorch reference included); ship = 1.
Seconds per unit start from the demo's stage times measured on a 2-core machine (``REFERENCE``)
and are replaced by what this machine measured: after each stage of a run, ``record`` keeps
its seconds per unit in ``$FTEDGE_CACHE/stage_rates.json`` (an average of the last runs). While
training, the loop's own wall time per step replaces the train rate, so the whole-run ETA the
progress bar shows is the steps left at the measured pace plus the stages still to come.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftedge import atomic

log = logging.getLogger(__name__)

STAGES = ("train", "merge", "export", "bench", "ship")

# Seconds per unit, from `make demo` on a 2-core AMD EPYC (issue 13: train 369 s for 150 steps with
# the model load, merge 19 s, export 80 s for 3 artifacts, bench 192 s for 200 rows x 4 artifacts) with
# the base model's safetensors at 0.54 GB.
REFERENCE: dict[str, float] = {"train": 2.46, "merge": 35.0, "export": 49.0, "bench": 0.24, "ship": 2.0}
REFERENCE_BASE_GB = 0.54
RATES_FILE = "stage_rates.json"
KEEP = 0.5  # weight of the previous rate when a new measurement comes in


def rates_path() -> Path:
    from ftedge.basemodel import cache_dir

    return cache_dir() / RATES_FILE


def _measured(path: Path) -> dict[str, float]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {k: float(v) for k, v in saved.items() if k in REFERENCE and isinstance(v, int | float) and v > 0}


def load_rates(path: Path | None = None) -> dict[str, float]:
    """Seconds per unit per stage: this machine's measurements over the reference ones."""
    return REFERENCE | _measured(path or rates_path())


def record(stage: str, seconds: float, units: float, path: Path | None = None) -> None:
    """Fold a finished stage's measured seconds per unit into the saved rates (best effort): the first
    measurement replaces the reference, later ones move the rate towards theirs."""
    if stage not in REFERENCE or units <= 0 or seconds <= 0:
        return
    path = path or rates_path()
    measured = _measured(path)
    new = seconds / units
    measured[stage] = KEEP * measured[stage] + (1 - KEEP) * new if stage in measured else new
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, measured)
    except OSError as err:  # an ETA is not worth failing a run for
        log.debug("could not save stage rates to %s: %s", path, err)


def estimate(units: Mapping[str, float], rates: Mapping[str, float]) -> dict[str, float]:
    """Seconds per stage."""
    return {stage: units.get(stage, 0.0) * rates[stage] for stage in STAGES if stage in units}


def remaining(
    estimates: Mapping[str, float], done: set[str] | frozenset[str], current: str | None = None, current_left: float = 0.0
) -> float:
    """Seconds left: what is left of the current stage, plus every later stage not already done."""
    after = current is None
    total = current_left
    for stage in STAGES:
        if stage == current:
            after = True
            continue
        if after and stage not in done and stage in estimates:
            total += estimates[stage]
    return total


def stage_units(recipe: Any, target: Any, *, base_gb: float, steps: int) -> dict[str, float]:
    """The work of each stage of ``recipe`` exported for ``target`` (see the module docstring)."""
    gguf = len(target.gguf.quants) if target.gguf is not None else 0
    onnx = len(target.onnx.precisions) if target.onnx is not None else 0
    exported = gguf + onnx
    benched = 1 + (len(recipe.eval.artifacts) if recipe.eval.artifacts is not None else exported + 1)  # + reference; all + merged
    return {
        "train": float(steps),
        "merge": base_gb,
        "export": base_gb * exported,
        "bench": float(recipe.eval.max_examples * benched),
        "ship": 1.0,
    }


def folder_gb(path: Path) -> float:
    """GB of the model weights (safetensors) in a folder."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e9


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
