"""The ship stage (``ftedge ship``): the ship/ bundle a user copies to a laptop.

``ship/`` holds the chosen GGUF (a copy, not a link), an Ollama ``Modelfile`` and a README
with the exact commands for ``ftedge chat``, llama.cpp and Ollama, and for serving it over an
OpenAI-compatible API (``ftedge serve``, ``llama-server``, Ollama, LM Studio: ftedge.launch).
Nothing in it refers to the run folder or the virtual environment. It is recorded as artifact
``ship`` once complete.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ftedge import atomic
from ftedge.errors import FtedgeError
from ftedge.formats.modelfile import write_modelfile
from ftedge.launch import launch_section
from ftedge.manifest import Artifact, Run
from ftedge.recipe import require_mergeable
from ftedge.targets import Target

log = logging.getLogger(__name__)


def choose_gguf(run: Run, target: Target) -> Artifact:
    """The target's `ship` quant if it passed its gate, else the first passing quantized GGUF of the target, else any passing GGUF."""
    passing = {a.quant: a for a in run.usable_models("gguf")}
    if not passing:
        raise FtedgeError(
            f"no GGUF artifact in {run.path} passed its parity gate",
            hint=f"see `ftedge export {run.path}` output; loosen the target's gates only if the figures are acceptable",
        )
    order = ([target.ship] if target.ship else []) + list(target.gguf.quants if target.gguf else []) + sorted(q for q in passing if q)
    return next(passing[q] for q in order if q in passing)


def ship_readme(model_file: str, model_name: str, system_prompt: str | None, stop: list[str]) -> str:
    sys_flag = f' -sys "{system_prompt}"' if system_prompt else ""
    sys_opt = f' --system "{system_prompt}"' if system_prompt else ""
    return f"""# {model_name}

A fine-tuned chat model made with ftedge. Copy this folder anywhere; it needs nothing else.

- `{model_file}`: the model (GGUF, chat template and stop tokens inside).
- `Modelfile`: for Ollama.

## Chat with it

ftedge (`pip install ftedge`):

    ftedge chat {model_file}{sys_opt}
    ftedge chat {model_file}{sys_opt} --prompt "your message"

llama.cpp (`llama-cli` from a llama.cpp build or release):

    llama-cli -m {model_file} -cnv{sys_flag} -n 128 --temp 0

Ollama:

    ollama create {model_name} -f Modelfile
    ollama run {model_name}

The reply ends at {", ".join(f"`{s}`" for s in stop) or "the model's end-of-turn token"}.
"""


def ship_stage(run: Run, target: Target, *, force: bool = False) -> Path:
    """Build ``run/ship`` atomically from the best passing GGUF; record it as artifact 'ship'."""
    out = run.path / "ship"
    if run.is_done("ship") and not force and run.artifact("ship") is not None and out.is_dir():
        log.info("ship: already done (%s); use --force to rebuild it", out)
        return out
    recipe = run.recipe()
    require_mergeable(recipe, "ship")
    chosen = choose_gguf(run, target)
    model_name = recipe.name.lower()
    model_file = f"{model_name}.{chosen.quant or 'gguf'}.gguf"
    with run.stage("ship") as metrics:
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            shutil.copy2(chosen.path, tmp / model_file)
            system = recipe.data.system_prompt
            stop = write_modelfile(tmp / model_file, tmp / "Modelfile", system=system, model_ref=f"./{model_file}")
            readme = ship_readme(model_file, model_name, system, stop) + launch_section(tmp / model_file, model_name, system)
            atomic.write_text(tmp / "README.md", readme)
        run.record_artifact("ship", out, stage="ship", format="bundle", source=chosen.key, model_file=model_file)
        metrics.update(source=chosen.key, model_file=model_file)
    log.info("shipped %s as %s", chosen.key, out / model_file)
    return out
