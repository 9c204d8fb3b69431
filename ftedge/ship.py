"""The ship stage (``ftedge ship``): the ship/ bundle a user copies to a laptop.

``ship/`` holds the chosen GGUF (a copy, not a link), an Ollama ``Modelfile`` and a README that
is also the model card (Hugging Face conventions: YAML front matter with base model, licence,
datasets, metrics and tags; then intended use, training recipe, data, evaluation with intervals,
drift from base, limits, why this file was chosen) with the exact commands for ``ftedge chat``,
llama.cpp and Ollama, and for serving it over an OpenAI-compatible API (``ftedge serve``,
``llama-server``, Ollama, LM Studio: ftedge.launch). Nothing in it refers to the run folder or
the virtual environment. It is recorded as artifact ``ship`` once complete.

Which GGUF: ``ftedge.choose.ship_choice``: the target's ``ship`` type, or with ``ship: auto`` the decision
``ftedge.choose.ship_decision`` takes on the bench's results (``bench/results.json``, recorded as artifact
``bench-results``; read here through ``ftedge.results``, never through bench's code). ONNX folders are shipped
only for a target without GGUF: the bundle's Modelfile, llama.cpp and LM Studio lines need a GGUF.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from ftedge import atomic
from ftedge.choose import ShipChoice, decision_markdown, ship_choice, show_metric
from ftedge.formats.modelfile import write_modelfile
from ftedge.launch import launch_section
from ftedge.manifest import Artifact, Run
from ftedge.recipe import require_mergeable
from ftedge.results import BenchResults, Entry, ShipDecision, load_results
from ftedge.targets import MB, Target

log = logging.getLogger(__name__)


def bench_results(run: Run) -> BenchResults | None:
    """The run's bench results (artifact ``bench-results``), None when bench has not run."""
    art = run.artifact("bench-results")
    if art is None or not art.path.is_file():
        return None
    return load_results(art.path)


def ship_readme(model_file: str, model_name: str, system_prompt: str | None, stop: list[str]) -> str:
    sys_flag = f' -sys "{system_prompt}"' if system_prompt else ""
    sys_opt = f' --system "{system_prompt}"' if system_prompt else ""
    return f"""# {model_name}

A fine-tuned chat model made with ftedge. Copy this folder anywhere; it needs nothing else.

- `{model_file}`: the model (GGUF, chat template and stop tokens inside).
- `Modelfile`: for Ollama.
- `README.md`: this file, also the model card (the YAML block at the top).

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


# -- the model card ---------------------------------------------------------------------------
def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _ci(entry: Entry, key: str, scale: float = 1.0, digits: int = 1, *, label: str | None = None) -> str:
    """`` [low, high]`` of an entry's 95% interval; with ``label``, `` (95% CI low-high{label})``."""
    ci = entry.value(f"{key}_ci")
    if not ci:
        return ""
    low, high = f"{scale * ci[0]:.{digits}f}", f"{scale * ci[1]:.{digits}f}"
    return f" [{low}, {high}]" if label is None else f" (95% CI {low}-{high}{label})"


def front_matter(recipe: Any, chosen: Artifact, doc: BenchResults | None) -> str:
    """Hugging Face model-card metadata: base_model, license, datasets, metrics, tags, model-index for the shipped file."""
    from ftedge.basemodel import card_base_model

    base_id, licence = card_base_model(recipe.base_model)
    classifier = recipe.data.format == "text_label"
    data_files = [Path(p).name for p in (recipe.data.train, recipe.data.val) if p is not None]
    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
    meta["license"] = licence or "unknown"
    meta["datasets"] = data_files
    meta["metrics"] = ["accuracy", "f1"] if classifier else ["perplexity", "chrf"]
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["ftedge", "gguf", chosen.quant or "gguf", recipe.train.method] + (["text-classification"] if classifier else ["chat"])
    entry = doc.entry(chosen.key) if doc is not None else None
    if entry is not None and entry.ok:
        figures = []
        if entry.accuracy is not None:
            figures.append(
                {"type": "accuracy", "value": round(entry.accuracy, 4), "name": "Accuracy" + _ci(entry, "accuracy", 100, label="%")}
            )
        if entry.macro_f1 is not None:
            figures.append({"type": "f1", "value": entry.macro_f1, "name": "Macro-F1"})
        if entry.perplexity is not None:
            figures.append(
                {
                    "type": "perplexity",
                    "value": round(entry.perplexity, 4),
                    "name": "Answer perplexity" + _ci(entry, "perplexity", 1, 3, label=""),
                }
            )
        if entry.chrf is not None:
            figures.append({"type": "chrf", "value": entry.chrf, "name": "chrF" + _ci(entry, "chrf", label="")})
        if figures and doc is not None:
            split = doc.eval.split or "held-out"
            meta["model-index"] = [
                {
                    "name": recipe.name,
                    "results": [
                        {
                            "task": {"type": "text-classification" if classifier else "text-generation"},
                            "dataset": {"name": f"{data_files[0]} ({split} rows)", "type": data_files[0]},
                            "metrics": figures,
                        }
                    ],
                }
            ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(
    run: Run, recipe: Any, chosen: Artifact, model_file: str, doc: BenchResults | None, decision: ShipDecision | None, target: Target
) -> str:
    """The model-card sections (after the front matter): intended use, training, data, evaluation, drift, limits, choice."""
    cfg, tr = recipe.data, recipe.train
    classifier = cfg.format == "text_label"
    base_id, _ = card_base_model_text(recipe.base_model)
    lines = [
        f"Tuned from {base_id} ({ {'qlora': 'QLoRA', 'lora': 'LoRA'}.get(tr.method, 'full fine-tuning') }), shipped as "
        f"`{model_file}` (GGUF {chosen.quant or ''}) for the **{target.name}** target.",
        "",
        "## Intended use",
        "",
    ]
    labels = _labels(doc, chosen.key)
    if classifier:
        shown = ", ".join(f"`{x}`" for x in labels[:20]) + (f" and {len(labels) - 20} more" if len(labels) > 20 else "")
        lines.append(
            "Classifies a user message: the reply is one label, as text"
            + (f" (the {len(labels)} labels seen in the test rows: {shown})." if labels else ".")
        )
    else:
        lines.append(f"Answers chat messages the way the training conversations (`{cfg.format}` data) do.")
    if cfg.system_prompt:
        lines.append(f"It was tuned with this system prompt, which every runtime below adds for you: {cfg.system_prompt!r}.")
    lines += [
        "Out of scope: questions unlike the training data, and any decision that needs a guarantee: it is a small model "
        "that can answer wrongly with confidence.",
        "",
        "## Training recipe",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {_cell(base_id)} |",
        f"| method | {tr.method}" + (f" ({_adapter_text(recipe.adapter)})" if tr.method != "full" else "") + " |",
        *([f"| objective | DPO ({tr.dpo_settings}) from {_cell(str(tr.init_from))} |"] if tr.objective == "dpo" else []),
        f"| base weights while training | {'4-bit ' + recipe.quant.type if recipe.quant.bits == 4 else f'{recipe.quant.bits}-bit float'} |",
    ]
    train = run.stage_metrics("train")
    steps = train.get("steps", tr.max_steps)
    lines += [
        f"| steps | {steps} (batch {tr.batch_size} x {tr.grad_accum} accumulation, max {tr.max_length} tokens"
        + (", packed" if tr.packing else "")
        + ") |",
        f"| learning rate | {tr.lr:g}, {tr.scheduler} schedule, {tr.warmup_ratio:g} warm-up |",
        f"| seed | {tr.seed} |",
    ]
    if train.get("best_eval_loss") is not None:
        lines.append(f"| best validation loss | {train['best_eval_loss']:.4f} (step {train.get('best_step')}) |")
    if train.get("seconds") is not None:
        lines.append(f"| training time | {train['seconds'] / 60:.1f} min |")
    merged = run.artifact("merged")
    if merged is not None and merged.mode:
        lines.append(f"| merged into | {merged.mode} base |")
    lines += ["", "## Data", ""]
    lines.append(
        f"- training file: `{Path(cfg.train).name}` (format `{cfg.format}`)"
        + (f", validation file `{Path(cfg.val).name}`" if cfg.val else "")
    )
    if doc is not None:
        ev = doc.eval
        lines.append(f"- evaluation: {ev.n_examples} {ev.split or 'held-out'} rows, scored by `ftedge bench` (task `{ev.task or 'none'}`)")
    lines += evaluation_section(doc, chosen.key, classifier)
    lines += drift_card_section(doc)
    lines += ["", "## Limits", ""]
    lines += [
        "- The figures come from rows of the same source as the training data; on other data (new phrasings, new topics) "
        "expect lower scores. The 95% intervals show how much the figures would move on another sample of that size.",
        "- The model inherits the base model's limits and biases, and it was quantized for the device: it can be wrong, "
        "and it answers greedily (temperature 0) in these figures.",
    ]
    if classifier:
        lines.append("- It knows only the labels it was trained on; a message that fits none still gets one of them.")
    else:
        lines.append("- chrF measures overlap with the reference wording, not correctness: read the answers in bench/report.md too.")
    lines.append("- Tuning moves a model away from its general behaviour: see the drift figures above before using it for anything else.")
    lines += ["", "## Why this file", ""]
    if decision is not None:
        lines += decision_markdown(decision)
    else:
        lines.append(
            f"The target profile names the quant to ship (`ship: {target.ship}`)."
            if target.ship
            else "The first GGUF quant of the target that passed its parity gate."
        )
    return "\n".join(lines) + "\n"


def card_base_model_text(spec: str) -> tuple[str, str | None]:
    from ftedge.basemodel import card_base_model

    base_id, licence = card_base_model(spec)
    return (f"`{base_id}`" if base_id else f"the local model `{Path(str(spec)).name}`"), licence


def _labels(doc: BenchResults | None, name: str) -> list[str]:
    entry = doc.entry(name) if doc is not None else None
    return sorted(entry.per_label) if entry is not None and entry.per_label else []


def evaluation_section(doc: BenchResults | None, shipped: str, classifier: bool) -> list[str]:
    """Every benched artifact's quality (with 95% intervals), size and speed; the shipped one in bold."""
    lines = ["", "## Evaluation", ""]
    if doc is None:
        return lines + ["Not benched: run `ftedge bench` on the run for quality and speed figures."]
    lines.append(
        f"Measured by `ftedge bench` on {doc.host.cpu} ({doc.target.threads} threads), against the reference "
        f"`{doc.reference}`; 95% bootstrap intervals over the test rows in brackets."
    )
    lines.append("")
    head = (
        ["artifact", "quant", "size MB"]
        + (["accuracy %", "macro-F1"] if classifier else ["chrF"])
        + ["ppl", "decode tok/s", "peak RSS MB", "fits"]
    )
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for e in doc.artifacts:
        if not e.ok:
            lines.append(f"| {_cell(e.name)} | failed | " + " | ".join("—" for _ in head[2:]) + " |")
            continue
        name = f"**{e.name} (shipped)**" if e.name == shipped else e.name + (" (reference)" if e.reference else "")
        row = [name, e.quant or "—", "—" if e.size_bytes is None else f"{e.size_bytes / MB:,.1f}"]
        if classifier:
            row += [
                "—" if e.accuracy is None else f"{100 * e.accuracy:.1f}{_ci(e, 'accuracy', 100)}",
                "—" if e.macro_f1 is None else f"{e.macro_f1:.3f}",
            ]
        else:
            row.append("—" if e.chrf is None else f"{e.chrf:.1f}{_ci(e, 'chrf')}")
        row += [
            "—" if e.perplexity is None else f"{e.perplexity:.3f}{_ci(e, 'perplexity', 1, 3)}",
            "—" if e.decode_tok_s is None else f"{e.decode_tok_s:.1f}",
            "—" if e.peak_rss_mb is None else f"{e.peak_rss_mb:,.0f}",
            {True: "yes", False: "no", None: "—"}[e.fits],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def drift_card_section(doc: BenchResults | None) -> list[str]:
    base = doc.drift_base if doc is not None else None
    if doc is None or base is None or base.status != "ok":
        return []
    ok = [e for e in doc.artifacts if e.ok and e.drift_kl is not None]
    base_ppl = base.general_ppl
    lines = [
        "",
        "## Drift from base (forgetting)",
        "",
        f"Each artifact against the untuned base model on {base.general_prompts} general prompts that are not the "
        f"task (KL and top-1 agreement over their short written answers) and {base.general_texts} paragraphs of general text "
        f"(perplexity; the base's: {show_metric('perplexity', base_ppl)}). The reference's drift is what tuning cost; more "
        "than the reference's is what quantization added.",
        "",
        "| artifact | KL from base (nats) | top-1 agreement | general-text ppl | vs base |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in ok:
        ppl = e.general_ppl
        ratio = f"{ppl / base_ppl:.2f}x" if ppl and base_ppl else "—"
        top1 = "—" if e.drift_top1 is None else f"{100 * e.drift_top1:.1f}%"
        lines.append(f"| {_cell(e.name)} | {e.drift_kl or 0.0:.4f} | {top1} | {show_metric('perplexity', ppl)} | {ratio} |")
    return lines


def _adapter_text(a: Any) -> str:
    """The adapter in the model card: method and shape."""
    if a.method in ("lora", "dora"):
        name = "LoRA" if a.method == "lora" else "DoRA"
        return f"{name} r={a.r}, alpha={a.alpha:g}, dropout={a.dropout:g}, modules {a.target_modules}"
    return f"IA3, modules {a.target_modules}" if a.method == "ia3" else a.method


def ship_stage(run: Run, target: Target, *, force: bool = False) -> Path:
    """Build ``run/ship`` atomically from the best passing GGUF (an ONNX folder for a target without GGUF); record it as 'ship'."""
    out = run.path / "ship"
    if run.is_done("ship") and not force and run.artifact("ship") is not None and out.is_dir():
        log.info("ship: already done (%s); use --force to rebuild it", out)
        return out
    recipe = run.recipe()
    require_mergeable(recipe, "ship")
    doc = bench_results(run)
    choice = ship_choice(run, target, doc)
    if choice.artifact.format == "onnx":  # a target without GGUF ships its best ONNX folder
        return ship_onnx(run, choice, out)
    chosen, decision = choice.artifact, choice.decision
    model_name = recipe.name.lower()
    model_file = f"{model_name}.{chosen.quant or 'gguf'}.gguf"
    with run.stage("ship") as metrics:
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            shutil.copy2(chosen.path, tmp / model_file)
            system = recipe.data.system_prompt
            stop = write_modelfile(tmp / model_file, tmp / "Modelfile", system=system, model_ref=f"./{model_file}")
            how = ship_readme(model_file, model_name, system, stop) + launch_section(tmp / model_file, model_name, system)
            head, mark, usage = how.partition("## Chat with it")
            card = model_card(run, recipe, chosen, model_file, doc, decision, target)
            readme = front_matter(recipe, chosen, doc) + "\n" + head + card + "\n" + mark + usage
            atomic.write_text(tmp / "README.md", readme)
        run.record_artifact("ship", out, stage="ship", format="bundle", source=chosen.key, model_file=model_file, rule=choice.rule)
        metrics.update(source=chosen.key, model_file=model_file, rule=choice.rule)
        if decision is not None:
            metrics["decision"] = decision.summary
    log.info("shipped %s as %s", chosen.key, out / model_file)
    return out


# --------------------------------------------------------------------------- targets without GGUF
def onnx_readme(folder: str, model_name: str, system_prompt: str | None) -> str:
    sys_opt = f' --system "{system_prompt}"' if system_prompt else ""
    return f"""# {model_name}

A fine-tuned chat model made with ftedge, as an onnxruntime-genai (ORT GenAI) folder for CPU: the target
profile asked for no GGUF. Copy this folder anywhere; it needs nothing else.

- `{folder}/`: the model (`model.onnx`, `genai_config.json`, tokenizer and `chat_template.jinja`).

## Chat with it

ftedge (`pip install ftedge`):

    ftedge chat {folder}{sys_opt}
    ftedge chat {folder}{sys_opt} --prompt "your message"

## Serve it (OpenAI-compatible API)

    ftedge serve {folder}{sys_opt}

Any onnxruntime-genai program can load the folder too (`og.Model("{folder}")`); render prompts with
`chat_template.jinja`, the template the model was tuned with.
"""


def ship_onnx(run: Run, choice: ShipChoice, out: Path) -> Path:
    """``run/ship`` from the best passing ONNX folder (a target without GGUF), with a README; recorded as 'ship'."""
    chosen = choice.artifact
    recipe = run.recipe()
    model_name = recipe.name.lower()
    folder = f"{model_name}.onnx-{chosen.quant}"
    with run.stage("ship") as metrics:
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            shutil.copytree(chosen.path, tmp / folder)
            atomic.write_text(tmp / "README.md", onnx_readme(folder, model_name, recipe.data.system_prompt))
        run.record_artifact("ship", out, stage="ship", format="bundle", source=chosen.key, model_file=folder)
        metrics.update(source=chosen.key, model_file=folder)
    log.info("shipped %s as %s", chosen.key, out / folder)
    return out
