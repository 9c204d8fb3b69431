"""What ``ftedge chat`` and ``ftedge serve`` open: the artifact a path names and the system prompt it was tuned with.

A path is a .gguf file, an ORT GenAI folder, an HF folder, or a run folder; for a run ``ftedge.choose.default_model``
picks: the shipped model, else the best GGUF (or ONNX folder) that passed its parity gate, else the merged model.
Neither command imports the other: both resolve here, and decode through the backend's one generation loop
(``Backend.stream``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ftedge.errors import FtedgeError
from ftedge.manifest import Run, find_run

log = logging.getLogger(__name__)


def pick_run_artifact(run: Run) -> Path:
    """What to chat with or serve in a run: ``ftedge.choose.default_model`` for the run's target (ship/'s model, else
    the best passing GGUF or ONNX, else the merged model)."""
    from ftedge.choose import default_model
    from ftedge.targets import load_target

    target = None
    name = run.target_name()
    if name is not None:
        try:
            target = load_target(name)
        except FtedgeError:  # the profile moved since: the vocabulary's order
            target = None
    return default_model(run, target)


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
