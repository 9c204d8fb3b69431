"""What ``ftedge chat`` and ``ftedge serve`` open: the artifact a path names and the system prompt it was tuned with.

A path is a .gguf file, an ORT GenAI folder, an HF folder, or a run folder; for a run the shipped GGUF is used,
else the first GGUF that passed its parity gate, else the merged model. Neither command imports the other: both
resolve here, and decode through the backend's one generation loop (``Backend.stream``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ftedge.errors import FtedgeError
from ftedge.manifest import Run, find_run

log = logging.getLogger(__name__)


def pick_run_artifact(run: Run) -> Path:
    """ship/*.gguf, else the first GGUF that passed its gate, else the merged model."""
    ship = sorted((run.path / "ship").glob("*.gguf"))
    if ship:
        return ship[0]
    ggufs = run.usable_models("gguf")
    if ggufs:
        return ggufs[0].path
    merged = run.artifact("merged")
    if merged is not None and merged.usable:
        return merged.path
    raise FtedgeError(
        f"{run.path} has no shipped, passing GGUF or merged model to chat with",
        hint=f"run `ftedge merge {run.path}` and `ftedge export {run.path}` first",
    )


def resolve(artifact: Path) -> tuple[Path, str | None]:
    """The model path to load and the default system prompt (the run's recipe, if any)."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise FtedgeError(f"{artifact} not found", hint="give a .gguf file, an ORT GenAI folder, an HF folder or a run folder")
    run = find_run(artifact)
    system = None
    if run is not None:
        try:
            system = run.recipe().data.system_prompt
        except FtedgeError:
            system = None
        if artifact.resolve() == run.path:
            artifact = pick_run_artifact(run)
            log.info("chatting with %s", run.rel(artifact))
    return artifact, system
