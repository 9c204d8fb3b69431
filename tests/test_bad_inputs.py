"""Bad and hostile inputs through the real CLI (``python -m ftedge.cli`` in a subprocess).

Every case must end with the expected exit code and exactly one line on stderr (``error: ...``
naming the problem), no traceback, and nothing recorded: no run folder appears, and a run the
command was given is left as it was (manifest and files; only its ``.run.lock`` may appear).

Read-only and full disks are real (a read-only bind mount, a 1 MB tmpfs) where this machine lets
root mount; "permission denied" is a real CLI process that dropped root for ``nobody``. Where that is not
possible the case is checked in-process by raising the same errno at the write site
(test_robust.py), and here it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import (
    cli_as_nobody,
    make_adapter,
    make_run,
    nobody_runs_ftedge,
    read_only,
    small_disk,
    write_gguf_header_only,
    write_text_label_csv,
)

from ftedge.manifest import LOCK, Run
from ftedge.recipe import load_recipe


@dataclass
class Case:
    name: str
    args: list[str]
    words: str | tuple[str, ...]  # must all appear in the one stderr line
    code: int = 2
    run: Path | None = None  # a run the command must leave unchanged
    as_nobody: bool = False  # run by a process that dropped root (root ignores permissions)


@dataclass
class Corpus:
    root: Path
    recipe: Path
    env: dict[str, str]
    cases: list[Case] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != LOCK}


def _cli(case: Case, corpus: Corpus) -> subprocess.CompletedProcess[str]:
    cmd = cli_as_nobody(case.args) if case.as_nobody else [sys.executable, "-m", "ftedge.cli", *case.args]
    return subprocess.run(cmd, cwd=corpus.root, env=corpus.env, capture_output=True, text=True, timeout=300)


def _recipe(root: Path, name: str, **changes) -> Path:
    raw = yaml.safe_load((root / "recipe.yaml").read_text())
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section][leaf] = value
        else:
            raw[section] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def corpus(tiny_model_dir: Path) -> Iterator[Corpus]:
    root = Path(tempfile.mkdtemp(prefix="ftedge-corpus-"))
    os.chmod(root, 0o755)  # world-readable: the permission case runs as `nobody`
    try:
        yield _make_corpus(root, tiny_model_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _make_corpus(root: Path, tiny_model_dir: Path) -> Corpus:
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    for path in (model, *model.iterdir()):  # readable by `nobody` too (the fixture's folder is private)
        path.chmod(0o755 if path.is_dir() else 0o644)
    data = write_text_label_csv(root / "train.csv")
    raw = {
        "name": "corpus",
        "base_model": str(model),
        "data": {"train": str(data), "format": "text_label", "text_field": "text", "label_field": "category", "val_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8},
        "quant": {"bits": 32, "compute_dtype": "float32"},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 4, "max_length": 64},
        "export": {"target": "laptop-cpu"},
    }
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "HOME": str(root), "FTEDGE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])
    c = Corpus(root, recipe, env)
    r = str(recipe)

    # -- recipes ------------------------------------------------------------------------
    (root / "broken.yaml").write_text("name: x\ntrain: [1, 2\n")
    (root / "list.yaml").write_text("- name: x\n")
    (root / "tag.yaml").write_text(f'!!python/object/apply:os.system ["touch {root}/pwned"]\n')
    c.cases += [
        Case("recipe not found", ["validate", "nope.yaml"], "recipe nope.yaml not found"),
        Case("recipe not YAML", ["validate", "broken.yaml"], "not valid YAML"),
        Case("recipe a YAML list", ["validate", "list.yaml"], "must be a YAML mapping"),
        Case("recipe with a python tag", ["train", "tag.yaml"], "not valid YAML"),
        Case("unknown key override", ["validate", r, "-o", "train.max_stepz=3"], "unknown key 'train.max_stepz'"),
        Case("override without =", ["validate", r, "-o", "train.max_steps"], "train.max_steps"),
        Case("override of the wrong type", ["validate", r, "-o", "train.lr=fast"], "train.lr"),
    ]

    # -- base models (validate catches them as train would) --------------------------------
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"x")
    (root / "bin-only").mkdir()
    shutil.copy(model / "config.json", root / "bin-only" / "config.json")
    (root / "bin-only" / "pytorch_model.bin").write_bytes(b"x")
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{not json")
    (root / "bad-config" / "model.safetensors").write_bytes(b"x")
    (root / "text.gguf").write_text("this is not a model\n")
    (root / "short.gguf").write_bytes(b"GGUF\x03\x00")
    write_gguf_header_only(root / "bert.gguf", "bert")
    c.cases += [
        Case("base model: absolute path that does not exist", ["validate", r, "-o", "base_model=/nonexistent/model"], "not found"),
        Case("base model: folder without config.json", ["validate", r, "-o", f"base_model={root / 'no-config'}"], "no config.json"),
        Case("base model: only pytorch_model.bin", ["validate", r, "-o", f"base_model={root / 'bin-only'}"], "no .safetensors"),
        Case("base model: broken config.json", ["validate", r, "-o", f"base_model={root / 'bad-config'}"], "cannot be read as JSON"),
        Case("base model: text file named .gguf", ["validate", r, "-o", f"base_model={root / 'text.gguf'}"], "not a GGUF file"),
        Case("base model: GGUF cut in its header", ["validate", r, "-o", f"base_model={root / 'short.gguf'}"], "truncated or damaged"),
        Case("base model: GGUF of an unreadable architecture", ["validate", r, "-o", f"base_model={root / 'bert.gguf'}"], "'bert'"),
        Case("base model: bad path in train", ["train", r, "-o", f"base_model={root / 'no-config'}"], "no config.json"),
    ]

    # -- data ---------------------------------------------------------------------------------
    (root / "empty-dir").mkdir()
    (root / "header-only.csv").write_text("text,category\n")
    (root / "garbage.csv").write_bytes(bytes(range(256)) * 4)
    (root / "bad.jsonl").write_text('{"text": "a", "category": "b"}\n{"text": \n')
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "category": "b"}\n'.encode("latin-1"))
    (root / "notes.txt").write_text("hello\n")
    (root / "one-class.csv").write_text("text,category\n" + "".join(f"row {i},same\n" for i in range(8)))
    (root / "empty-val.csv").write_text("text,category\n")
    for name, override, words in (
        ("missing file", f"data.train={root / 'missing.csv'}", "not found"),
        ("empty directory", f"data.train={root / 'empty-dir'}", "empty folder"),
        ("header-only CSV", f"data.train={root / 'header-only.csv'}", "has no rows"),
        ("binary CSV", f"data.train={root / 'garbage.csv'}", "UTF-8"),
        ("broken JSONL line", f"data.train={root / 'bad.jsonl'}", "line 2: not valid JSON"),
        ("JSONL not in UTF-8", f"data.train={root / 'latin1.jsonl'}", "not UTF-8"),
        ("unsupported file type", f"data.train={root / 'notes.txt'}", "unsupported file type"),
        ("a single label", f"data.train={root / 'one-class.csv'}", "single class"),
        ("label field missing", "data.label_field=intent", "row has no 'intent'"),
        ("empty validation file", f"data.val={root / 'empty-val.csv'}", "has no rows"),
    ):
        c.cases.append(Case(f"data: {name}", ["validate", r, "-o", override], words))
    c.cases.append(Case("data: empty directory in train", ["train", r, "-o", f"data.train={root / 'empty-dir'}"], "empty folder"))

    # -- targets --------------------------------------------------------------------------------
    (root / "fp16.yaml").write_text("name: fp16\ngguf: null\nonnx: {precisions: [fp16]}\n")
    c.cases += [
        Case("target: unknown name", ["validate", r, "-o", "export.target=no-such-target"], "no-such-target"),
        Case("target: a precision no exporter builds", ["validate", r, "-o", f"export.target={root / 'fp16.yaml'}"], "'fp16'"),
    ]

    # -- runs -------------------------------------------------------------------------------------
    untrained = Run.create(load_recipe(recipe), run_dir=root / "untrained").path
    u = str(untrained)
    (root / "not-a-run").mkdir()
    (root / "damaged").mkdir()
    (root / "damaged" / "manifest.json").write_text("{broken")
    (root / "a-file").write_text("x")
    c.cases += [
        Case("merge before train", ["merge", u], f"run `ftedge train --resume {untrained}` first", run=untrained),
        Case("export before merge", ["export", u], f"run `ftedge merge {untrained}` first", run=untrained),
        Case("ship before export", ["ship", u], f"run `ftedge bench {untrained}` first", run=untrained),
        Case("bench before export", ["bench", u], "no artifacts", run=untrained),
        Case("merge of a missing run", ["merge", str(root / "nope")], "not found"),
        Case("merge of a folder that is no run", ["merge", str(root / "not-a-run")], "not an ftedge run"),
        Case("merge of a damaged manifest", ["merge", str(root / "damaged")], "cannot be read"),
        Case("train into a folder that holds a run", ["train", r, "--run-dir", u], "already holds a run (train pending)", run=untrained),
        Case("train into a file", ["train", r, "--run-dir", str(root / "a-file")], "is a file, not a folder"),
        Case("--force without --run-dir", ["train", r, "--force"], "--force replaces the run in --run-dir"),
        Case("--force with --resume", ["train", "--resume", u, "--force"], "give one of them", run=untrained),
        Case("--resume with a recipe", ["train", r, "--resume", u], "--resume continues a run", run=untrained),
    ]

    # -- one process per run: a run this test process holds ---------------------------------------
    busy = Run.create(load_recipe(recipe), run_dir=root / "busy").path
    for args in (["train", "--resume", str(busy)], ["merge", str(busy)], ["export", str(busy)], ["run", "--resume", str(busy)]):
        c.cases.append(
            Case(f"{args[0]} while another process trains", args, f"is being trained by another process (pid {os.getpid()})", run=busy)
        )

    # -- chat -------------------------------------------------------------------------------------
    c.cases += [
        Case("chat with an empty --prompt", ["chat", str(root / "bert.gguf"), "--prompt", ""], "--prompt is empty"),
        Case("chat with a blank --prompt", ["chat", str(root / "bert.gguf"), "--prompt", "   "], "--prompt is empty"),
        Case("chat with a missing model", ["chat", str(root / "nope.gguf"), "-p", "hi"], "not found"),
        Case("chat with a text file named .gguf", ["chat", str(root / "text.gguf"), "-p", "hi"], "not a GGUF file"),
        Case("bench a text file named .gguf", ["bench", str(root / "text.gguf")], "not a GGUF file"),
    ]
    return c


def _check(case: Case, res: subprocess.CompletedProcess[str], before: dict[str, bytes] | None) -> list[str]:
    problems = []
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if res.returncode != case.code:
        problems.append(f"exit {res.returncode}, wanted {case.code}")
    if "Traceback" in res.stderr:
        problems.append("a traceback")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} stderr lines")
    else:
        words = (case.words,) if isinstance(case.words, str) else case.words
        problems += [f"no {w!r} in the line" for w in words if w not in lines[0]]
    if case.run is not None and before is not None and _snapshot(case.run) != before:
        problems.append("the run changed")
    return [f"{case.name}: {', '.join(problems)}\n    stderr: {res.stderr.strip()[-600:]}"] if problems else []


def _run_cases(corpus: Corpus, cases: list[Case]) -> list[str]:
    befores = {c.name: _snapshot(c.run) if c.run is not None else None for c in cases}
    # Two at a time, but never two on the same run: each command takes the run's lock, and a second one
    # there would be (rightly) refused as "being used by another process".
    groups: dict[object, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.run if c.run is not None else i, []).append(i)
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(cases)

    def run_group(indices: list[int]) -> None:
        for i in indices:
            results[i] = _cli(cases[i], corpus)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run_group, groups.values()))
    problems = []
    for case, res in zip(cases, results, strict=True):
        if os.environ.get("FTEDGE_SHOW_CORPUS"):
            print(f"{case.name}: {res.returncode} {res.stderr.strip()}")
        problems += _check(case, res, befores[case.name])
    return problems


def test_bad_inputs_are_one_line_and_record_nothing(corpus: Corpus) -> None:
    busy = Run.open(corpus.root / "busy")
    with busy.lock("train"):  # held by this process while the CLI tries the run
        problems = _run_cases(corpus, corpus.cases)
    assert not (corpus.root / "runs").exists(), "a run folder was created"
    assert not (corpus.root / "pwned").exists(), "a YAML tag ran code"
    assert not problems, "\n".join(problems)
    assert len(corpus.cases) >= 45


def test_disks_and_permissions_are_one_line_and_record_nothing(
    corpus: Corpus, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Read-only run and --run-dir, permission denied, a full disk before the merge: real where root may mount/setuid."""
    root = corpus.root
    cases: list[Case] = []
    unavailable: list[str] = []
    run = Run.create(load_recipe(corpus.recipe), run_dir=root / "ro-run").path
    ro_dir = root / "ro-dir"
    ro_dir.mkdir()
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("corpus-adapter") / "adapter")
    with read_only(run) as run_ro, read_only(ro_dir) as dir_ro, small_disk(root / "full", "1m") as full_ok:
        if run_ro and dir_ro:
            cases += [
                Case("read-only run: export", ["export", str(run)], ("cannot write", "read-only file system"), run=run),
                Case("read-only run: train --resume", ["train", "--resume", str(run)], "read-only file system", run=run),
                Case("read-only run: bench", ["bench", str(run)], "read-only file system", run=run),
                Case("read-only --run-dir", ["train", str(corpus.recipe), "--run-dir", str(ro_dir / "new")], "read-only file system"),
            ]
        else:
            unavailable.append("read-only mounts")
        if full_ok:
            trained = make_run(root / "full", tiny_model_dir, adapter, name="full").path
            words = ("not enough disk space for the merged float32 model", "needs about 12.", "KB free")
            cases.append(Case("full disk: merge", ["merge", str(trained)], words, run=trained))
        else:
            unavailable.append("tmpfs")
        if nobody_runs_ftedge(corpus.env, root):
            other = Run.create(load_recipe(corpus.recipe), run_dir=root / "root-only-run").path
            secret = root / "secret.csv"
            shutil.copy(root / "train.csv", secret)
            secret.chmod(0o600)
            denied = ("cannot write", "permission denied")
            cases += [
                Case("permission denied: export", ["export", str(other)], denied, run=other, as_nobody=True),
                Case(
                    "permission denied: data", ["validate", str(corpus.recipe), "-o", f"data.train={secret}"], "cannot read", as_nobody=True
                ),
            ]
        else:
            unavailable.append("running as nobody")
        problems = _run_cases(corpus, cases)
    assert not problems, "\n".join(problems)
    assert not (ro_dir / "new").exists() and not (root / "runs").exists()
    if unavailable:
        pytest.skip(f"checked in-process only (test_robust.py): {', '.join(unavailable)} not permitted here")
