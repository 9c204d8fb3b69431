"""ftedge chat: one-shot --prompt through the CLI, run-folder artifact choice, streaming, history."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ftedge import chat, session
from ftedge.cli import main
from ftedge.errors import FtedgeError
from ftedge.manifest import Run
from ftedge.recipe import load_recipe


def test_chat_prompt_one_shot_prints_the_greedy_reply(tiny_gguf: Path) -> None:
    from ftedge.backends import load_backend

    with load_backend(tiny_gguf, threads=1) as backend:
        expected = backend.reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], max_new_tokens=12)
    assert expected  # a random model still says something within 12 tokens
    result = CliRunner().invoke(
        main, ["chat", str(tiny_gguf), "--prompt", "hello", "--system", "Be brief.", "--max-new-tokens", "12", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"


def test_chat_on_a_run_uses_its_system_prompt_and_best_artifact(
    tmp_path: Path, tiny_recipe: Path, tiny_gguf: Path, tiny_model_dir: Path
) -> None:
    import shutil

    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    with pytest.raises(FtedgeError, match="ftedge merge"):
        session.pick_run_artifact(run)
    shutil.copytree(tiny_model_dir, run.path / "merged")
    run.record_artifact("merged", run.path / "merged", stage="merge", format="hf")  # as the merge stage records it
    assert session.pick_run_artifact(run) == run.path / "merged"
    (run.path / "gguf").mkdir()
    for name, passed in (("a.q4_k_m.gguf", False), ("b.q8_0.gguf", True)):
        shutil.copy(tiny_gguf, run.path / "gguf" / name)
        run.record_artifact(f"gguf-{name.split('.')[1]}", run.path / "gguf" / name, stage="export", format="gguf", gate={"passed": passed})
    assert session.pick_run_artifact(run) == run.path / "gguf" / "b.q8_0.gguf"  # the first one failed its gate
    (run.path / "ship").mkdir()
    shutil.copy(tiny_gguf, run.path / "ship" / "model.gguf")
    assert session.pick_run_artifact(run) == run.path / "ship" / "model.gguf"

    path, system = session.resolve(run.path)
    assert path == run.path / "ship" / "model.gguf" and system == session.SystemPrompt("Reply with the intent label.", "run recipe")
    assert session.resolve(run.path / "gguf" / "b.q8_0.gguf") == (run.path / "gguf" / "b.q8_0.gguf", system)  # a file inside a run

    from ftedge.backends import load_backend

    with load_backend(tiny_gguf, threads=1) as backend:
        expected = backend.reply([{"role": "system", "content": system.text}, {"role": "user", "content": "hi"}], max_new_tokens=8)
    result = CliRunner().invoke(main, ["chat", str(run.path), "-p", "hi", "--max-new-tokens", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(expected + "\n")


def test_interactive_session_streams_keeps_history_and_resets(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(tiny_model_dir, threads=1)
    first = backend.reply([{"role": "user", "content": "hi"}], max_new_tokens=5)
    second = backend.reply(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first}, {"role": "user", "content": "more"}], max_new_tokens=5
    )
    seen: list[list[str]] = []
    original = backend.chat_ids

    def recording(messages):
        seen.append([m["content"] for m in messages])
        return original(messages)

    backend.chat_ids = recording  # type: ignore[method-assign]
    chat.interactive(backend, None, max_new_tokens=5, n_ctx=512, lines=["hi", "more", "/reset", "hi", "/exit", "never read"])
    out = capsys.readouterr().out
    assert out == f"bot> {first}\nbot> {second}\nbot> {first}\n"
    prompts = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]  # fit_history checks the same list
    assert prompts == [["hi"], ["hi", first, "more"], ["hi"]]


def test_stream_decoder_matches_full_detokenization(tiny_model_dir: Path) -> None:
    from ftedge.backends.base import StreamDecoder
    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(tiny_model_dir, threads=1)
    text = "Grüße aus Köln — 東京 🚀 ok"
    ids = backend.tokenize(text)
    decoder = StreamDecoder(backend)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == backend.detokenize(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_history_is_trimmed_to_the_context(tiny_model_dir: Path) -> None:
    from ftedge.backends.torch import TorchBackend

    backend = TorchBackend(tiny_model_dir, threads=1)
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"question number {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    msgs.append({"role": "user", "content": "last"})
    budget = 120
    kept = chat.fit_history(backend, msgs, n_ctx=budget + 8, max_new_tokens=8)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert len(backend.chat_ids(kept)) <= budget < len(backend.chat_ids(msgs))
    assert kept[1]["role"] == "user"  # whole turns dropped, oldest first
    with pytest.raises(FtedgeError, match="longer than the context") as info:
        chat.fit_history(backend, [{"role": "user", "content": "word " * 200}], n_ctx=60, max_new_tokens=10)
    assert "context of 60 tokens" in str(info.value) and "shorter message" in str(info.value)  # names the real context and fix
    assert "--max-new-tokens" not in info.value.hint  # the prompt alone is over the context: lowering the reply cannot help
    with pytest.raises(FtedgeError, match="or lower --max-new-tokens"):  # here it can
        chat.fit_history(backend, [{"role": "user", "content": "word " * 20}], n_ctx=60, max_new_tokens=30)


def test_chat_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["chat", str(tmp_path / "nope.gguf"), "-p", "hi"])
    assert result.exit_code == 2 and "not found" in result.output and len(result.output.strip().splitlines()) == 1


def test_an_over_long_prompt_names_the_real_context_and_option(tiny_gguf: Path) -> None:
    """The tiny model was trained with a 512-token context: chat opens that (not 4096) and says so, naming its own option."""
    result = CliRunner().invoke(main, ["chat", str(tiny_gguf), "-p", "word " * 440, "--max-new-tokens", "64", "--threads", "1"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "context of 512 tokens" in line and "keeps 64 for the reply" in line
    assert "or lower --max-new-tokens" in line  # the prompt alone fits 512: a shorter reply would make room


def test_served_system_prompt_is_the_runs_recipe_else_its_bundles_modelfile(tmp_path: Path, tiny_recipe: Path) -> None:
    """The one answer chat, serve and bench share: which system prompt a model is served with, and from where."""
    import yaml

    from ftedge.session import SystemPrompt, served_system_prompt

    def bundle(folder: Path, system: str | None, models: tuple[str, ...] = ("m.gguf",)) -> Path:
        folder.mkdir(parents=True)
        for name in models:
            (folder / name).write_bytes(b"GGUF")
        (folder / "Modelfile").write_text("FROM ./m.gguf\n" + (f'SYSTEM """{system}"""\n' if system else ""))
        return folder / models[0]

    assert served_system_prompt(bundle(tmp_path / "alone" / "ship", "From the Modelfile.")) == SystemPrompt(
        "From the Modelfile.", "ship/Modelfile"
    )
    assert served_system_prompt(bundle(tmp_path / "bare" / "ship", None)) == SystemPrompt(None, "none")
    assert served_system_prompt(bundle(tmp_path / "two", "Whose?", ("m.gguf", "n.gguf"))) == SystemPrompt(None, "none")
    run = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "run")
    assert served_system_prompt(bundle(run.path / "ship", "Edited by hand.")) == SystemPrompt("Reply with the intent label.", "run recipe")
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["data"]["system_prompt"] = None
    tiny_recipe.write_text(yaml.safe_dump(raw))
    silent = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "silent")
    assert served_system_prompt(bundle(silent.path / "ship", "Only here.")) == SystemPrompt("Only here.", "ship/Modelfile")
    (silent.path / "ship" / "Modelfile").unlink()
    assert served_system_prompt(silent.path / "ship" / "m.gguf") == SystemPrompt(None, "run recipe")
    assert SystemPrompt("word " * 20, "x").short() == ("word " * 12).strip() + "…" and SystemPrompt(None, "none").short() == "none"
