"""Plain test helper functions (tests/ is on sys.path under pytest). Fixtures are in conftest.py; tiny models are
built in tiny_models.py (the one home of tiny-model building).

- data: ``LABELS``, ``ROWS``, ``SYSTEM``, ``write_text_label_csv``;
- runs: ``make_adapter`` (a PEFT LoRA adapter with random, small non-zero B matrices),
  ``make_run`` (a run whose train stage is done), ``tiny_target``;
- disks and users (the tests run as root): ``small_disk`` (a real tmpfs), ``read_only`` (a real
  read-only bind mount), both yielding False where mounting is not permitted, and
  ``cli_as_nobody`` / ``nobody_runs_ftedge`` (the CLI in a process that dropped root); ``write_gguf_header_only``.

GGUF conversion in tests goes through ftedge's own ``ftedge.export.gguf.convert_to_gguf``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]


def write_text_label_csv(path: Path, n: int = 64, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    templates = {
        "card_arrival": ["where is my new card", "my card has not arrived yet", "when will the card come"],
        "lost_or_stolen_card": ["i lost my card", "my card was stolen", "someone took my card"],
        "exchange_rate": ["what is the exchange rate", "how much is a euro in dollars", "rate for pounds"],
        "top_up_failed": ["my top up failed", "the top-up did not work", "why was my top up declined"],
    }
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            w.writerow([rng.choice(templates[label]) + rng.choice(["", "?", " please", "!"]), label])
    return path


ROWS = [
    ("where is my new card", "card_arrival"),
    ("my card has not arrived yet", "card_arrival"),
    ("i lost my card", "lost_or_stolen_card"),
    ("my card was stolen", "lost_or_stolen_card"),
    ("what is the exchange rate", "exchange_rate"),
    ("rate for pounds", "exchange_rate"),
    ("my top up failed", "top_up_failed"),
    ("why was my top up declined", "top_up_failed"),
]
SYSTEM = "Reply with the intent label."


def make_adapter(base: Path, out: Path, *, scale: float = 0.05, seed: int = 0, load_in_4bit: bool = False) -> Path:
    """A LoRA adapter (r=4, all linear layers) with random non-zero weights, saved with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale / max(float(p.abs().mean()), 1e-8))
    peft_model.save_pretrained(out)
    return out


def make_run(tmp: Path, base: Path, adapter: Path, *, qlora: bool = False, name: str = "tiny", gates: dict | None = None):
    """A run whose train stage is done, with ``adapter`` recorded as artifact 'adapter'."""
    import shutil

    from ftedge.data.splits import freeze_splits
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe

    data = tmp / "train.csv"
    rng = random.Random(0)
    lines = ["text,category"] + [f"{t}{rng.choice(['', '?', ' please'])},{label}" for t, label in ROWS * 4]
    data.write_text("\n".join(lines) + "\n")
    recipe = {
        "name": name,
        "base_model": str(base),
        "data": {
            "train": str(data),
            "format": "text_label",
            "text_field": "text",
            "label_field": "category",
            "system_prompt": SYSTEM,
            "val_fraction": 0.25,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quant": {"bits": 4, "compute_dtype": "float32"} if qlora else {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "qlora" if qlora else "lora", "max_steps": 4, "batch_size": 4, "max_length": 64},
        "export": {"target": "laptop-cpu"},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = Run.create(load_recipe(path), run_dir=tmp / "run")
    with run.stage("train"):
        freeze_splits(run)  # what the train stage does first
        shutil.copytree(adapter, run.path / "adapter")
        run.record_artifact("adapter", run.path / "adapter", stage="train")
    return run


def tiny_target(tmp: Path, quants: list[str], gates: dict | None = None, onnx: list[str] | None = None):
    from ftedge.targets import load_target

    raw = {
        "name": "tiny-target",
        "gguf": {"quants": quants},
        "onnx": {"precisions": onnx} if onnx else None,
        "n_ctx": 512,
        "threads": 2,
        "ship": quants[0] if quants else None,
    }
    if gates:
        raw["gates"] = gates
    path = tmp / "tiny-target.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_target(path)


# -- disks and users for the bad-input tests (the tests run as root, which ignores permissions) ------------
def _mount(*args: str) -> bool:
    import shutil
    import subprocess

    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[bool]:
    """A real tmpfs of ``size`` mounted at ``path`` (a full disk in a few writes); yields False where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield mounted
    finally:
        if mounted:
            _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[bool]:
    """``path`` made a real read-only file system (a read-only bind mount onto itself); False where not permitted."""
    mounted = _mount("--bind", str(path), str(path))
    if mounted and not _mount("-o", "remount,ro,bind", str(path)):
        _umount(path)
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            _umount(path)


NOBODY = 65534
# Imports everything an early refusal needs, then gives up root for `nobody` (the interpreter itself may live
# where `nobody` cannot read, e.g. under /root) and runs the CLI with the given arguments.
_AS_NOBODY = (
    "import os, sys, difflib; import ftedge.cli, ftedge.commands, ftedge.logs, ftedge.manifest, ftedge.validate, ftedge.formats.gguf; "
    "import rich.logging; "
    "os.setgroups([]); os.setgid({uid}); os.setuid({uid}); sys.argv = ['ftedge', *sys.argv[1:]]; ftedge.cli.main()"
)


def cli_as_nobody(args: list[str]) -> list[str]:
    """The command line of ``ftedge ARGS`` run by a process that has dropped root for ``nobody``."""
    import sys

    return [sys.executable, "-c", _AS_NOBODY.format(uid=NOBODY), *args]


def nobody_runs_ftedge(env: dict[str, str], cwd: Path) -> bool:
    """Whether a process can drop root for ``nobody`` here and still run ftedge's CLI."""
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        res = subprocess.run(cli_as_nobody(["--version"]), env=env, cwd=cwd, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def write_gguf_header_only(path: Path, arch: str, name: str = "tiny") -> Path:
    """A minimal valid GGUF of llama.cpp architecture ``arch`` (one small tensor): enough for header checks."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def start_serve_cli(args: list[str], *, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`ftedge serve ARGS` as a subprocess; returns it with its URL once it says it listens (fails after ``timeout`` s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftedge.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
        assert time.time() < deadline
    proc.kill()
    raise AssertionError(f"ftedge serve did not start: {proc.stderr.read() if proc.stderr else ''}")
