"""Nothing lost, nothing misleading (issue 12): one process per run, honest disk and permission errors,
usual file modes, a failed train that can be resumed or replaced, label warnings, valid hints.

The bad-input corpus through the real CLI is tests/test_bad_inputs.py; these are the mechanisms.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import small_disk, write_gguf_header_only

from ftedge import atomic
from ftedge.cli import main
from ftedge.errors import DiskError, DiskFullError, FtedgeError, check_free_space, from_os_error, os_error_in
from ftedge.manifest import Run
from ftedge.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _usual(mode: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


# -- errors: one mapping, typed by errno ------------------------------------------------------------
def test_the_cause_is_read_from_library_and_subprocess_text() -> None:
    cases = {
        "OSError: [Errno 28] No space left on device: '/x/.model.gguf.tmp'": errno.ENOSPC,  # Python in a subprocess
        'Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: "Read-only file system" })': errno.EROFS,
        "failed to open file (os error 13)": errno.EACCES,  # Rust
        "llama_model_quantize: failed: No space left on device": errno.ENOSPC,  # C words
        "PermissionError: [Errno 1] Operation not permitted": errno.EPERM,
    }
    for text, code in cases.items():
        cause = os_error_in(text)
        assert cause is not None and cause.errno == code, text
    assert os_error_in("KeyError: 'model.embed_tokens.weight'", Path.cwd()) is None  # not a disk problem on a disk with room
    assert os_error_in("[Errno 2] No such file or directory") is None  # not something a disk fix cures


def test_from_os_error_is_typed_by_errno_and_names_the_path(tmp_path: Path) -> None:
    where = tmp_path / "run" / "merged"
    for code, kind, words in (
        (errno.ENOSPC, DiskFullError, "no space left to write"),
        (errno.EROFS, DiskError, "read-only file system"),
        (errno.EACCES, DiskError, "permission denied"),
        (errno.ENOENT, FtedgeError, "does not exist"),
        (errno.ENOTDIR, FtedgeError, "is a file, not a folder"),
    ):
        err = from_os_error(OSError(code, os.strerror(code)), where)
        assert type(err) is kind and words in str(err) and str(where) in str(err) and "\n" not in str(err)
    named = from_os_error(OSError(errno.EACCES, "Permission denied", "/some/file"), action="read")
    assert str(named).startswith("cannot read /some/file: permission denied")


def test_free_space_check_gives_both_figures(tmp_path: Path) -> None:
    import shutil

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path, 1024, "a small file")  # room: no error
    with pytest.raises(DiskFullError) as info:
        check_free_space(tmp_path / "not" / "made" / "yet", free + 10**12, "the f16 GGUF")
    text = str(info.value)
    assert text.startswith(f"not enough disk space for the f16 GGUF in {tmp_path / 'not' / 'made' / 'yet'}: it needs about ")
    import re

    needed, free_shown = re.search(r"needs about ([\d.]+ TB), ([\d.]+ [KMGT]?B) free", text).groups()
    assert needed == f"{(free + 10**12) / 1e12:.1f} TB" and free_shown.split()[0] != "0"


def test_atomic_path_gives_the_usual_modes(tmp_path: Path) -> None:
    """Libraries write 0600 files and 0700 folders (mkstemp, safetensors); what ftedge ships gets 0644 / 0755 under the umask."""
    mask = os.umask(0o022)
    try:
        with atomic.atomic_path(tmp_path / "model") as tmp:
            os.mkdir(tmp, 0o700)
            os.mkdir(tmp / "sub", 0o700)
            for name, mode in (("weights.safetensors", 0o600), ("sub/model.onnx.data", 0o600), ("tool", 0o700)):
                os.close(os.open(tmp / name, os.O_CREAT | os.O_WRONLY, mode))
        with atomic.atomic_path(tmp_path / "one.gguf") as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(mask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [tmp_path / "model", *tmp_path.rglob("*")]}
    assert modes == {
        "model": 0o755,
        "model/sub": 0o755,
        "model/weights.safetensors": 0o644,
        "model/sub/model.onnx.data": 0o644,
        "model/tool": 0o755,
        "one.gguf": 0o644,
    }


def test_a_library_write_error_in_atomic_path_names_the_artifact(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(DiskFullError, match=f"no space left to write {out}"), atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    with pytest.raises(ValueError, match="a bug"), atomic.atomic_path(out) as tmp:  # anything else is left alone
        raise ValueError("a bug")
    with pytest.raises(FileNotFoundError), atomic.atomic_path(out) as tmp:  # a missing input is not a disk problem
        open(tmp_path / "missing-input")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_inside_a_library_write_is_found_by_the_free_space(tmp_path: Path) -> None:
    """torch.save says only "file write failed"; on a disk that is now full, the cause is no space (real tmpfs)."""
    with small_disk(tmp_path / "disk", "256k") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        import torch

        out = tmp_path / "disk" / "checkpoint"
        with pytest.raises(DiskFullError, match=f"no space left to write {out}"), atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            torch.save(torch.zeros(200_000), tmp / "optim.pt")
        assert list((tmp_path / "disk").iterdir()) == []


def test_the_cli_maps_a_stray_os_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ftedge import commands

    def stray(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out.json"))

    monkeypatch.setattr(commands, "bench", stray)
    line = _one_line(CliRunner().invoke(main, ["bench", str(tmp_path)]))
    fix = "(fix: remount it read-write or use a folder on a writable disk)"
    assert line == f"error: cannot write {tmp_path / 'out.json'}: read-only file system {fix}"


# -- one process per run ---------------------------------------------------------------------------
_HOLD = """
import sys, time
from ftedge.manifest import Run
run = Run.open(sys.argv[1])
with run.stage(sys.argv[2]):
    print("holding", flush=True)
    time.sleep(120)
"""


def _holder(run: Run, stage: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run.path), stage], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_stage_holds_the_run_and_a_killed_one_becomes_interrupted(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    proc = _holder(run, "export")
    try:
        again = Run.open(run.path)  # the holder is alive: still running, not interrupted
        assert again.stage_status("export") == "running" and again.manifest()["stages"]["export"]["pid"] == proc.pid
        for stage in ("merge", "export", "train"):
            with pytest.raises(FtedgeError, match=rf"is being exported by another process \(pid {proc.pid}\)"), again.stage(stage):
                pass
        assert again.stage_status("merge") == "pending"  # the refused stage recorded nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = Run.open(run.path)  # the next command sees the killed stage
    st = after.manifest()["stages"]["export"]
    assert st["status"] == "interrupted" and str(proc.pid) in st["error"]
    with after.stage("export"):  # the dead process's lock blocks no one
        pass
    assert after.is_done("export")


def test_the_lock_is_reentrant_within_a_process(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    with run.lock("train"), run.stage("train"), Run(run.path).stage("merge"):
        pass
    assert run.is_done("train") and run.is_done("merge")


_CREATE = """
import sys, time
from pathlib import Path
from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
try:
    Run.create(recipe, run_dir=sys.argv[2])
    print("created")
except FtedgeError as err:
    print("refused:", err)
"""


def test_two_processes_creating_one_run_dir_make_one_run(tiny_recipe: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CREATE, str(tiny_recipe), str(tmp_path / "r"), str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(3)  # let them import and wait at the start line
    go.touch()
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs[0] == "created" and all(o.startswith("refused:") for o in outs[1:]), outs
    reasons = ("already holds a run", "is being created by another process", "is being used by another process (it has just started)")
    assert all(any(r in o for r in reasons) for o in outs[1:]), outs
    assert Run.open(tmp_path / "r").recipe().name == "tiny"


# -- a train that fails is recorded; --resume and --force start cleanly -------------------------------
def test_a_train_that_fails_to_load_is_recorded_and_force_replaces_it(tiny_recipe: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from ftedge.loader import load_causal_lm

    broken = tmp_path / "broken-model"  # passes validate (config.json + safetensors), fails to load
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("tokenizer*"))
    run_dir = tmp_path / "run"
    cli = CliRunner()
    args = ["train", str(tiny_recipe), "--run-dir", str(run_dir), "-o", "train.max_steps=2"]
    line = _one_line(cli.invoke(main, [*args, "-o", f"base_model={broken}"]))
    assert f"cannot load the tokenizer of {broken}" in line
    train = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]
    assert train["status"] == "failed" and "cannot load the tokenizer" in train["error"]

    line = _one_line(cli.invoke(main, args))  # the same --run-dir again: refused, saying why and how
    assert "already holds a run (train failed: cannot load the tokenizer" in line and "--force" in line

    result = cli.invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    run = Run.open(run_dir)
    assert run.is_done("train") and run.recipe().base_model == str(tiny_model_dir)
    assert json.loads((run.path / "train" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    mode = _usual()
    assert all(p.stat().st_mode & 0o777 == mode for p in (run.path / "adapter").iterdir()), "the adapter must be readable by others"

    import torch

    (broken / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:300])  # weights cut short
    with pytest.raises(FtedgeError, match=f"cannot load model {broken}"):
        load_causal_lm(broken, dtype=torch.float32)


def test_resume_of_a_train_that_failed_before_its_first_checkpoint_starts_cleanly(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftedge.train import loop as train_loop
    from ftedge.train import train_stage

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"].update(max_steps=4, save_every=4, eval_every=2)
    tiny_recipe.write_text(yaml.safe_dump(raw))
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    real = train_loop.Trainer.train_step

    def fails_at_step_3(self, step):
        if step == 2:
            raise RuntimeError("the machine fell over")
        return real(self, step)

    with monkeypatch.context() as m:
        m.setattr(train_loop.Trainer, "train_step", fails_at_step_3)
        with pytest.raises(RuntimeError):
            train_stage(run)
    st = run.manifest()["stages"]["train"]
    assert st["status"] == "failed" and st["error"] == "the machine fell over"
    assert (run.path / "train" / "metrics.jsonl").is_file() and not (run.path / "train" / "checkpoints").exists()

    metrics = train_stage(Run.open(run.path), resume=True)
    assert metrics["steps"] == 4 and run.is_done("train")
    steps = [json.loads(ln)["step"] for ln in (run.path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # every step once: the failed attempt's records are gone
    assert len(list((run.path / "train").glob("events.out.tfevents.*"))) == 1


# -- validate resolves the base model by train's rules -------------------------------------------------
def test_validate_reads_the_architecture_without_loading(tiny_recipe: Path, tmp_path: Path) -> None:
    from ftedge.validate import preflight

    lines = preflight(tiny_recipe, ["base_model=smollm2-135m-instruct"])  # the alias: read from its GGUF header
    assert any("base model smollm2-135m-instruct: embedded" in ln for ln in lines), lines
    assert any("architecture LlamaForCausalLM" in ln and ln.endswith("(from the GGUF header)") for ln in lines), lines
    gguf = write_gguf_header_only(tmp_path / "tiny.gguf", "qwen2")
    lines = preflight(tiny_recipe, [f"base_model={gguf}", "chat_template=chatml"])  # a header without a template
    assert f"base model {gguf}: GGUF file" in lines, lines
    assert any("architecture Qwen2ForCausalLM" in ln and ln.endswith("(from the GGUF header)") for ln in lines), lines
    lines = preflight(tiny_recipe, ["base_model=some-org/some-model"])
    assert "architecture: checked once the model is downloaded (a hub id)" in lines
    lines = preflight(tiny_recipe)
    assert not any("checked once" in ln for ln in lines)  # a local folder is checked now


# -- hints name commands that exist ------------------------------------------------------------------
def test_hints_name_valid_commands(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    for command in ("merge", "export"):
        line = _one_line(CliRunner().invoke(main, [command, str(run.path)]))
        hinted = line.split("`")[1]
        assert hinted.startswith("ftedge "), line
        main.make_context("ftedge", shlex.split(hinted)[1:])  # raises click.UsageError if it is not a valid command


# -- label warnings ----------------------------------------------------------------------------------
def test_label_warnings() -> None:
    from ftedge.data.splits import label_warnings

    train = ["a", "a", "b", "b", "c"]
    assert label_warnings(train, ["a", "b"], "validation") == [
        "1 label appears only once in the training data ('c'): one example is rarely enough to learn a label"
    ]
    warned = label_warnings(train, ["a", "d", "e"], "validation")
    assert warned[1] == "validation: 2 of its 3 labels never appear in the training data ('d', 'e'): the model cannot have learned them"
    assert label_warnings(["a", "a", "b", "b"], ["x", "y"], "bench data f.csv") == [
        "bench data f.csv: none of its 2 labels appear in the training data ('x', 'y'): its accuracy will be 0"
    ]
    assert label_warnings(["a", "a", "b", "b"], ["a", "b"], "validation") == []


def test_train_and_bench_warn_about_labels(tiny_recipe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ftedge.bench.stage import data_file_config, data_file_examples, warn_unlearned_labels
    from ftedge.data.splits import check_dataset

    data = tmp_path / "rare.csv"
    rows = [f"text {i},common" for i in range(10)] + [f"text {i},other" for i in range(10)] + ["lonely text,rare"]
    data.write_text("text,category\n" + "\n".join(rows) + "\n")
    recipe = load_recipe(tiny_recipe, [f"data.train={data}", "data.val_fraction=0.0"])
    with caplog.at_level("WARNING"):
        check_dataset(recipe)
    assert "1 label appears only once in the training data ('rare')" in caplog.text

    run = Run.create(recipe, run_dir=tmp_path / "r")
    other = tmp_path / "other.csv"
    other.write_text("text,label\nhello,greeting\nbye,farewell\n")
    examples = data_file_examples(other, data_file_config(other)[0])
    warned = warn_unlearned_labels(run, examples, f"bench data {other}")
    assert (
        warned[-1]
        == f"bench data {other}: none of its 2 labels appear in the training data ('farewell', 'greeting'): its accuracy will be 0"
    )


# -- chat ---------------------------------------------------------------------------------------------
def test_chat_refuses_an_empty_prompt(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    for prompt in ("", "  \n"):
        assert "--prompt is empty" in _one_line(CliRunner().invoke(main, ["chat", str(model), "--prompt", prompt]))


# -- disk and permission errors at ftedge's own write sites (simulated where the real ones need mounts) -----
@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_run_that_cannot_be_written_is_one_line(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """The errno raised where the run's lock is opened (as a read-only disk or a folder of another user does)."""
    import ftedge.manifest

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    before = run.manifest_path.read_bytes()

    def refused(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ftedge.manifest, "open", refused, raising=False)
    for command in (["export", str(run.path)], ["merge", str(run.path)], ["train", "--resume", str(run.path)]):
        line = _one_line(CliRunner().invoke(main, command))
        assert f"cannot write {run.path / '.run.lock'}: {words}" in line and f"run folder {run.path}" in line
    assert run.manifest_path.read_bytes() == before


def test_an_os_error_inside_a_stage_is_recorded_as_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "r")
    target = run.path / "ship" / "README.md"
    with pytest.raises(DiskError) as info, run.stage("ship"):
        raise OSError(errno.EACCES, "Permission denied", str(target))
    assert str(info.value).startswith(f"cannot access {target}: permission denied")
    st = run.manifest()["stages"]["ship"]
    assert st["status"] == "failed" and st["error"] == str(info.value)


def test_merge_checks_the_free_space_before_loading_anything(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from helpers import make_adapter, make_run

    import ftedge.errors
    from ftedge.merge import merge_stage

    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")
    run = make_run(tmp_path, tiny_model_dir, adapter)
    monkeypatch.setattr(ftedge.errors, "free_bytes", lambda folder: 5_000_000)  # a disk with 5 MB left
    with pytest.raises(DiskFullError, match=r"merged float32 model in .*: it needs about 12\.\d MB, 5\.0 MB free"):
        merge_stage(run)
    assert run.stage_status("merge") == "pending" and not (run.path / "merged").exists()


def test_the_converter_running_out_of_space_says_so(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real disk full inside llama.cpp's converter subprocess: its stderr is read for the cause (real tmpfs)."""
    import ftedge.export.gguf as g

    with small_disk(tmp_path / "disk", "2m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        monkeypatch.setattr(g, "check_free_space", lambda *a, **k: None)  # let it start, as an estimate that was too low would
        out = tmp_path / "disk" / "model-f16.gguf"
        with pytest.raises(DiskFullError, match=f"no space left to write {out}"):
            g.convert_to_gguf(tiny_model_dir, out, outtype="f16")
        assert list((tmp_path / "disk").iterdir()) == []


@pytest.mark.parametrize("what", ["f16 GGUF", "ONNX int4"])
def test_exports_check_the_free_space_first(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """Before the converter or the builder starts: the expected size (weights x bytes per weight) against what is free."""
    import ftedge.errors
    from ftedge.basemodel import parameter_count

    monkeypatch.setattr(ftedge.errors, "free_bytes", lambda folder: 1_000_000)
    params = parameter_count(tiny_model_dir)
    if what == "f16 GGUF":
        from ftedge.export.gguf import convert_to_gguf

        with pytest.raises(
            DiskFullError, match=rf"the f16 GGUF model-f16.gguf in .*: it needs about {params * 2 / 1e6:.1f} MB, 1.0 MB free"
        ):
            convert_to_gguf(tiny_model_dir, tmp_path / "model-f16.gguf", outtype="f16")
    else:
        pytest.importorskip("onnxruntime_genai")
        from ftedge.export.onnx import export_onnx

        with pytest.raises(DiskFullError, match=rf"the ONNX int4 export in .*: it needs about {params * 0.5 / 1e6:.1f} MB, 1.0 MB free"):
            export_onnx(tiny_model_dir, tmp_path / "onnx" / "int4", "int4")
    assert [p.name for p in tmp_path.rglob("*")] in ([], ["onnx"])


@pytest.mark.slow
def test_the_onnx_builder_running_out_of_space_says_so(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real disk full inside onnxruntime-genai's builder subprocess: its output is read for the cause (real tmpfs)."""
    pytest.importorskip("onnxruntime_genai")
    import ftedge.export.onnx as onnx_export

    with small_disk(tmp_path / "disk", "4m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        monkeypatch.setattr(onnx_export, "check_free_space", lambda *a, **k: None)
        out = tmp_path / "disk" / "fp32"
        with pytest.raises(DiskFullError, match=f"no space left to write {out}"):
            onnx_export.export_onnx(tiny_model_dir, out, "fp32")
        assert list((tmp_path / "disk").iterdir()) == []


def test_a_read_only_model_cache_says_which_setting_to_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .gguf base model is dequantized once into $FTEDGE_CACHE: a cache that cannot be written is named, with the setting."""
    from helpers import read_only

    from ftedge.loader import gguf_to_hf

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FTEDGE_CACHE", str(cache))
    gguf = write_gguf_header_only(tmp_path / "m.gguf", "llama")
    with read_only(cache) as mounted:
        if not mounted:  # the same errno where the cache folder is made
            real_mkdir = Path.mkdir

            def mkdir(self, *args, **kwargs):
                if str(self).startswith(str(cache)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
                return real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(Path, "mkdir", mkdir)
        with pytest.raises(DiskError, match=rf"cannot write {cache / 'models'}: read-only file system \(fix: set FTEDGE_CACHE"):
            gguf_to_hf(gguf)
