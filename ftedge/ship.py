"""The ship/ bundle: what a user copies to a laptop.

``ship/`` holds the chosen GGUF (a copy, not a link), an Ollama ``Modelfile`` and a README
with the exact commands for ``ftedge chat``, llama.cpp and Ollama, and for serving it over an
OpenAI-compatible API (``ftedge serve``, ``llama-server``, Ollama, LM Studio: ftedge.launch).
Nothing in it refers to the run folder or the virtual environment.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.errors import FtedgeError
from ftedge.launch import launch_section
from ftedge.run import Run
from ftedge.targets import Target

log = logging.getLogger(__name__)


def choose_gguf(run: Run, target: Target) -> tuple[str, dict[str, Any]]:
    """The target's `ship` quant if it passed its gate, else the first passing quantized GGUF, else any passing GGUF."""
    ggufs = {k: v for k, v in run.artifacts(stage="export").items() if v.get("format") == "gguf"}
    passing = {k: v for k, v in ggufs.items() if v.get("gate", {}).get("passed", True) and v.get("status", "done") != "failed"}
    if not passing:
        raise FtedgeError(f"no GGUF artifact in {run.path} passed its parity gate", hint=f"see `ftedge export {run.path}` output; loosen the target's gates only if the figures are acceptable")
    preferred = [f"gguf-{target.ship}"] if target.ship else []
    order = preferred + [f"gguf-{q}" for q in (target.gguf.quants if target.gguf else [])] + sorted(passing)
    for key in order:
        if key in passing:
            return key, passing[key]
    raise AssertionError("unreachable")


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


def ship_stage(run: Run, target: Target) -> Path:
    """Build ``run/ship`` atomically from the best passing GGUF; record it as artifact 'ship'."""
    key, entry = choose_gguf(run, target)
    src = run.path / entry["path"]
    recipe = run.recipe()
    model_name = recipe.name.lower()
    model_file = f"{model_name}.{entry.get('quant', 'gguf')}.gguf"
    out = run.path / "ship"
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        shutil.copy2(src, tmp / model_file)
        stop = _write_modelfile(tmp / model_file, tmp / "Modelfile", recipe.data.system_prompt)
        readme = ship_readme(model_file, model_name, recipe.data.system_prompt, stop) + launch_section(tmp / model_file, model_name, recipe.data.system_prompt)
        (tmp / "README.md").write_text(readme)
    run.record_artifact("ship", out, stage="ship", format="bundle", source=key, model_file=model_file)
    log.info("shipped %s as %s", key, out / model_file)
    return out


def _write_modelfile(gguf_path: Path, out: Path, system_prompt: str | None) -> list[str]:
    from ftedge.modelfile import write_modelfile

    return write_modelfile(gguf_path, out, system=system_prompt, model_ref=f"./{gguf_path.name}")
