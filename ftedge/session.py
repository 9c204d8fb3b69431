"""What ``ftedge chat``, ``ftedge serve`` and ``ftedge bench ARTIFACT`` open: the artifact a path names and the system
prompt it is served with.

A path is a .gguf file, an ORT GenAI folder, an HF folder, a ship/ bundle (a folder holding one model) or a run folder;
for a run ``ftedge.choose.default_model`` picks: the shipped model, else the best GGUF (or ONNX folder) that passed its
parity gate, else the merged model. :func:`served_system_prompt` is THE answer to "which system prompt is this model
served with": chat, serve and bench all ask it. Neither command imports the other: both resolve here, and decode
through the backend's one generation loop (``Backend.stream``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ftedge.errors import FtedgeError
from ftedge.manifest import Run, find_run

log = logging.getLogger(__name__)

RUN_RECIPE = "run recipe"
NO_SYSTEM = "none"


@dataclass(frozen=True)
class SystemPrompt:
    """A system prompt and where it comes from (``run recipe``, ``<bundle>/Modelfile``, ``none``, or a caller's own
    source such as ``-o data.system_prompt``)."""

    text: str | None
    source: str

    def short(self, width: int = 60) -> str:
        """The prompt on one line, cut at ``width`` characters (``none`` when there is none)."""
        if not self.text:
            return "none"
        flat = " ".join(self.text.split())
        return flat if len(flat) <= width else flat[:width].rstrip() + "…"


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


def served_system_prompt(model: Path) -> SystemPrompt:
    """The system prompt ``model`` (a .gguf, an ORT GenAI folder or an HF folder) is served with: the recipe of the run it
    lives in (ship/, gguf/, onnx/, merged/), else (no run, or a recipe without one) the SYSTEM line of the Modelfile of
    the bundle it is the model of (a ship/ folder copied out of its run), else none."""
    from ftedge.choose import bundle_model
    from ftedge.formats.modelfile import read_modelfile_system

    model = Path(model)
    run = find_run(model)
    recipe: SystemPrompt | None = None
    if run is not None:
        try:
            recipe = SystemPrompt(run.recipe().data.system_prompt, RUN_RECIPE)
        except FtedgeError:  # the run's recipe is unreadable: what its bundle says, if anything
            recipe = None
    if recipe is not None and recipe.text is not None:
        return recipe
    folder = model.parent
    if (folder / "Modelfile").is_file():
        try:
            own = bundle_model(folder)
        except FtedgeError:  # several models: the Modelfile is not this one's alone
            own = None
        if own is not None and own.resolve() == model.resolve():
            text = read_modelfile_system(folder)
            if text is not None:
                return SystemPrompt(text, f"{folder.name}/Modelfile")
    return recipe or SystemPrompt(None, NO_SYSTEM)


def resolve(artifact: Path) -> tuple[Path, SystemPrompt]:
    """The model to load for ``artifact`` (a model, a ship/ bundle or a run folder) and the system prompt it is served
    with (:func:`served_system_prompt`)."""
    from ftedge.choose import bundle_model

    artifact = Path(artifact)
    if not artifact.exists():
        raise FtedgeError(
            f"{artifact} not found", hint="give a .gguf file, an ORT GenAI folder, an HF folder, a ship/ folder or a run folder"
        )
    run = find_run(artifact)
    if run is not None and artifact.resolve() == run.path:
        artifact = pick_run_artifact(run)
        log.info("chatting with %s", run.rel(artifact))
    elif artifact.is_dir() and not (artifact / "genai_config.json").is_file() and not (artifact / "config.json").is_file():
        model = bundle_model(artifact)  # a ship/ bundle: its one model
        if model is not None:
            artifact = model
    return artifact, served_system_prompt(artifact)
