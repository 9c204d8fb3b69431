"""The ``ftedge`` command line: click only. Each command parses its options, calls one function of
``ftedge.commands`` and prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ftedge import __version__
from ftedge.errors import FtedgeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FtedgeGroup(click.Group):
    """Turns FtedgeError, a stray OSError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except FtedgeError as err:
            if debug:
                raise
            click.secho(f"error: {err.one_line()}", fg="red", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="yellow", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except OSError as err:  # a disk or permission problem no stage named: still one line naming the path
            if debug:
                raise
            from ftedge.errors import from_os_error

            user = from_os_error(err, action="access")
            click.secho(f"error: {user.one_line()}", fg="red", err=True)
            ctx.exit(user.exit_code)
        except Exception as err:  # an unexpected bug: still one line unless --debug
            if debug:
                raise
            click.secho(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", fg="red", err=True)
            ctx.exit(1)


@click.group(cls=FtedgeGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="ftedge")
@click.option("--debug", is_flag=True, help="Show debug logs and full tracebacks.")
def main(debug: bool) -> None:
    """ftedge: QLoRA-tune a small LM, merge, export GGUF/ONNX, benchmark, ship.

    \b
    Quick start (embedded SmolLM2-135M-Instruct, no network needed):
      ftedge run recipes/smollm2-banking77.yaml
      ftedge chat runs/<run>/ship/*.gguf
    """
    from ftedge.logs import setup_logging

    setup_logging(debug)


overrides_option = click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. -o train.max_steps=20 -o data.train=my.csv (repeatable).",
)


@main.command(context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path), required=False)
@overrides_option
@click.option("--explain", is_flag=True, help="Print every recipe key with its type, default and description.")
def validate(recipe: Path | None, overrides: tuple[str, ...], explain: bool) -> None:
    """Check a recipe (schema, data files, target, model support) without training.

    An input the recipe's made_by names a command for (a DPO recipe's preference data, its SFT run) may
    not be made yet: it is listed as todo with the command that makes it.

    \b
    Examples:
      ftedge validate recipes/smollm2-banking77.yaml
      ftedge validate recipes/smollm2-banking77.yaml -o train.lr=1e-4
      ftedge validate --explain
    """
    if explain:
        from ftedge.recipe import explain as explain_rows

        for key, type_name, default, desc in explain_rows():
            if type_name == "section":
                click.secho(f"\n{key}:  {desc}", bold=True)
            else:
                click.echo(f"  {key}  [{type_name}] default={default}\n      {desc}")
        if recipe is None:
            return
    if recipe is None:
        raise click.UsageError("give a RECIPE (or --explain)")
    from ftedge.validate import TODO, preflight

    report = preflight(recipe, list(overrides), pending_ok=True)
    for line in report:
        if line.startswith(TODO):
            click.secho(f"todo  {line.removeprefix(TODO)}", fg="yellow")
        else:
            click.echo(f"ok  {line}")
    todo = sum(line.startswith(TODO) for line in report)
    still = f" ({todo} input{'s' if todo > 1 else ''} still to make: see todo above)" if todo else ""
    click.secho(f"{recipe}: valid{still}", fg="green")


@main.group(context_settings=CONTEXT)
def data() -> None:
    """Look at a recipe's data before training on it; make preference data from a trained run."""


@data.command(name="check", context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path))
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (for scripts) instead of a table.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) when validation/test rows also occur in training (leakage).")
@click.option("--no-tokens", is_flag=True, help="Skip the token-length check (it loads the base model's tokenizer).")
def data_check(recipe: Path, overrides: tuple[str, ...], as_json: bool, strict: bool, no_tokens: bool) -> None:
    """Duplicates, near-duplicates, train/validation/test leakage, label balance, empty answers,
    over-long rows (in the base model's own chat template) and mixed encodings.

    \b
    Examples:
      ftedge data check recipes/smollm2-banking77.yaml
      ftedge data check recipes/smollm2-banking77.yaml --json --strict
    """
    import json

    from ftedge import commands

    def emit(report: Any) -> None:
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            from rich.console import Console

            Console().print(report.table())

    commands.data_check(recipe, list(overrides), strict=strict, tokens=not no_tokens, emit=emit)


@data.command(name="preferences", context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), help="Folder to write the preference set into [default: RUN-preferences beside RUN]."
)
@click.option("--rows", type=click.IntRange(min=1), help="Training rows to answer (each wrong answer becomes a pair) [default: 3000].")
def data_preferences(run: Path, out: Path | None, rows: int | None) -> None:
    """A run's own mistakes as DPO preference data: its merged model answers the run's training rows
    (never a validation or test row) and each wrong answer becomes a pair, chosen = the gold answer,
    rejected = the model's (train.jsonl); val.jsonl and test.jsonl hold the run's validation and test
    rows as pairs, so a DPO run from RUN benches on RUN's test rows. Merges RUN first if needed.

    \b
    Examples:
      ftedge data preferences runs/banking77-sft -o runs/banking77-preferences
      ftedge data preferences runs/banking77-sft --rows 500
    """
    from ftedge import commands

    stats = commands.data_preferences(run, out=out, rows=rows)
    click.echo(
        f"{stats['out']}: {stats['preference_pairs']} preference pairs from {stats['train_rows_answered']} training rows "
        f"({100 * stats['train_accuracy']:.1f}% answered right), {stats['val_pairs']} validation and {stats['test_pairs']} test pairs"
    )


@main.command(context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path), required=False)
@overrides_option
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run folder to create (default runs/<name>-<UTC time>).")
@click.option("--resume", "resume", type=click.Path(path_type=Path), help="Continue training an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace the run already in --run-dir (e.g. one whose training failed); its files are deleted.")
def train(recipe: Path | None, overrides: tuple[str, ...], run_dir: Path | None, resume: Path | None, force: bool) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE into a new run folder.

    \b
    Examples:
      ftedge train recipes/smollm2-banking77.yaml
      ftedge train recipes/smollm2-banking77.yaml -o train.max_steps=20 --run-dir runs/try1
      ftedge train --resume runs/try1
      ftedge train recipes/smollm2-banking77.yaml --run-dir runs/try1 --force
    """
    from ftedge import commands

    if resume is None and recipe is None:
        raise click.UsageError("give a RECIPE, or --resume RUN")
    run = commands.train(recipe, list(overrides), run_dir=run_dir, resume=resume, force=force)
    click.echo(f"run: {run.path}")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option(
    "--into",
    type=click.Choice(["dequantized", "float"]),
    default=None,
    help="Merge into the dequantized NF4 base (default) or the float base.",
)
@click.option("--force", is_flag=True, help="Redo a finished merge.")
def merge(run_dir: Path, into: str | None, force: bool) -> None:
    """Merge the run's adapter into its base model (safetensors, tokenizer, chat template).

    \b
    Example:
      ftedge merge runs/smollm2-banking77-20261126-120000
    """
    from ftedge import commands

    commands.merge(run_dir, into=into, force=force)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Target profile name in export/ or a YAML path (default: the recipe's).")
@click.option("--force", is_flag=True, help="Redo finished exports.")
def export(run_dir: Path, target: str | None, force: bool) -> None:
    """Export the merged model as GGUF / ONNX artifacts of a target profile, each parity-gated.

    \b
    Examples:
      ftedge export runs/my-run
      ftedge export runs/my-run --target raspberry-pi-5
    """
    from ftedge import commands

    commands.export(run_dir, target=target, force=force)


@main.command(context_settings=CONTEXT)
@click.argument("subject", metavar="RUN|ARTIFACT", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Target profile (threads, budgets); default: the run's, else laptop-cpu.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write results JSON here.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="For a standalone artifact: a labelled file to score (CSV/JSONL in a recipe format; default text_label, text + label columns).",
)
@click.option(
    "--recipe", type=click.Path(path_type=Path), help="With --data: read it as this recipe's data (format, fields, system prompt)."
)
@click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --data: a data.* or eval.* recipe key, e.g. -o data.label_field=intent -o data.system_prompt='...' (repeatable).",
)
def bench(
    subject: Path, target: str | None, json_path: Path | None, data: Path | None, recipe: Path | None, overrides: tuple[str, ...]
) -> None:
    """Benchmark accuracy and latency of every artifact of a run (on its test split), or of one .gguf / ONNX folder.

    \b
    Examples:
      ftedge bench runs/my-run
      ftedge bench model.q4_k_m.gguf --data test.csv --json out.json
      ftedge bench ship/model.gguf --data new.csv --recipe recipes/smollm2-banking77.yaml
      ftedge bench model.gguf --data chats.jsonl -o data.format=messages
    """
    from ftedge import commands

    commands.bench(subject, target=target, json_path=json_path, data=data, recipe=recipe, overrides=list(overrides))


@main.command(name="run", context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path), required=False)
@overrides_option
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run folder to create.")
@click.option("--resume", type=click.Path(path_type=Path), help="Continue an interrupted run from its first unfinished stage.")
@click.option("--force", is_flag=True, help="Replace the run already in --run-dir; its files are deleted.")
def run_cmd(recipe: Path | None, overrides: tuple[str, ...], run_dir: Path | None, resume: Path | None, force: bool) -> None:
    """Everything: train, merge, export, bench, and a ship/ bundle.

    \b
    Examples:
      ftedge run recipes/smollm2-banking77.yaml
      ftedge run --resume runs/smollm2-banking77-20261126-120000
    """
    from ftedge import commands

    if resume is None and recipe is None:
        raise click.UsageError("give a RECIPE, or --resume RUN")
    run = commands.run_all(recipe, list(overrides), run_dir=run_dir, resume=resume, force=force)
    click.echo(f"run: {run.path}")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Target profile (which quant to ship); default: the run's.")
@click.option("--force", is_flag=True, help="Rebuild a finished ship/ bundle.")
def ship(run_dir: Path, target: str | None, force: bool) -> None:
    """Build the run's ship/ bundle: the chosen GGUF, an Ollama Modelfile and a README.

    \b
    Example:
      ftedge ship runs/my-run
    """
    from ftedge import commands

    out = commands.ship(run_dir, target=target, force=force)
    click.echo(f"ship: {out}")


@main.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Answer one message and exit (for scripts).")
@click.option("--system", default=None, help="System prompt (default: the run's recipe, else none).")
@click.option("--max-new-tokens", default=256, show_default=True, help="Reply length limit.")
@click.option("--threads", default=None, type=int, help="CPU threads.")
def chat(artifact: Path, prompt: str | None, system: str | None, max_new_tokens: int, threads: int | None) -> None:
    """Chat with a .gguf, an ONNX folder, a merged HF folder, or a run (its best artifact).

    \b
    Examples:
      ftedge chat runs/my-run/ship/model.q4_k_m.gguf
      ftedge chat runs/my-run -p "I still haven't received my card"
    """
    from ftedge import commands

    commands.chat(artifact, prompt=prompt, system=system, max_new_tokens=max_new_tokens, threads=threads)


@main.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface, with a warning).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads.")
@click.option(
    "--api-key",
    default=None,
    envvar="FTEDGE_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every API request (or set FTEDGE_API_KEY).",
)
@click.option(
    "--system", default=None, help='Default system prompt, used when a request has none (default: the run\'s recipe; "" for none).'
)
@click.option(
    "--ctx", "n_ctx", default=None, type=click.IntRange(min=16), help="Context size in tokens (default: the model's, at most 4096)."
)
def serve(artifact: Path, host: str, port: int, threads: int | None, api_key: str | None, system: str | None, n_ctx: int | None) -> None:
    """Serve a .gguf, an ONNX folder, a run or a ship/ folder: OpenAI-compatible API and a chat page.

    \b
    Examples:
      ftedge serve runs/my-run/ship
      ftedge serve runs/my-run/onnx/int4 --threads 4 --port 8080

    Then open http://127.0.0.1:8000/ or point any OpenAI client at http://127.0.0.1:8000/v1.
    """
    from ftedge import commands

    commands.serve(
        artifact,
        host=host,
        port=port,
        threads=threads,
        api_key=api_key or None,
        system=system,
        n_ctx=n_ctx,
        say=click.echo,
        warn=lambda msg: click.secho(msg, fg="yellow", err=True),
    )


if __name__ == "__main__":  # pragma: no cover
    main()
