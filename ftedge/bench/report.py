"""Bench results for people: a rich terminal table, ``report.md``, ``results.json`` and ``plot.png``.

Everything here reads the typed results (``ftedge.results.BenchResults``), never results.json's keys.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftedge import atomic
from ftedge.results import BenchResults, Entry, write_results

log = logging.getLogger(__name__)

MB = 1024 * 1024


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: "—" if v is None else f"{v:,.{digits}f}"


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _size(v: Any) -> str:
    return "—" if v is None else f"{v / MB:,.1f}"


def _fits(v: Any) -> str:
    return {True: "yes", False: "NO", None: "—"}[v]


def _kl(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}"


def _ci_pct(v: Any) -> str:
    return "—" if not v else f"{100 * v[0]:.1f}–{100 * v[1]:.1f}"


# (key, header, formatter, right-aligned)
COLUMNS: list[tuple[str, str, Callable[[Any], str], bool]] = [
    ("name", "artifact", str, False),
    ("quant", "quant", lambda v: v or "—", False),
    ("size_bytes", "size MB", _size, True),
    ("accuracy", "accuracy", _pct, True),
    ("accuracy_ci", "95% CI", _ci_pct, True),
    ("macro_f1", "macro-F1", _num(3), True),
    ("perplexity", "ppl", _num(3), True),
    ("chrf", "chrF", _num(1), True),
    ("top1_agreement", "top-1", _pct, True),
    ("kl", "KL", _kl, True),
    ("drift_kl", "drift KL", _kl, True),
    ("drift_top1", "drift top-1", _pct, True),
    ("general_ppl", "gen. ppl", _num(2), True),
    ("ttft_ms", "TTFT ms", _num(1), True),
    ("prefill_tok_s", "prefill tok/s", _num(1), True),
    ("decode_tok_s", "decode tok/s", _num(1), True),
    ("decode_tok_s_p95", "p95 tok/s", _num(1), True),
    ("peak_rss_mb", "peak RSS MB", _num(0), True),
    ("fits", "fits", _fits, False),
]

# Shown only when some artifact has a value (a chat run has no accuracy, a standalone file no drift).
OPTIONAL = {"accuracy_ci", "macro_f1", "chrf", "drift_kl", "drift_top1", "general_ppl"}
REPORT_ONLY = {"accuracy_ci", "general_ppl"}  # the terminal table stays within 180-200 columns

NOTES = [
    "accuracy: the greedy answer equals the label after trimming; every answer is what token-by-token decoding gives "
    "(budget: the longest label in tokens + 8); 95% CI: percentile bootstrap over the test rows (2,000 resamples, fixed seed).",
    "macro-F1: the F1 of each gold label (scikit-learn), averaged with equal weight; an answer that is no label counts "
    "against its gold label's recall.",
    "chrF: character n-gram F-score (sacrebleu, 0-100) of the greedy answers to the first test prompts against their "
    "reference answers (chat data); wording-sensitive, read it next to the answers below.",
    "ppl: perplexity of the held-out answers (and end-of-turn token) given their prompts.",
    "top-1 / KL: next-token agreement and KL(reference || artifact) in nats over every position of the held-out "
    "conversations after the prefix they all share (system prompt, template header; scored once it would "
    "count N times); KL groups the tokens outside the reference's top 64 into one (a tight lower bound).",
    "TTFT / prefill: time to the first generated token of the speed prompt; decode tok/s: median over repeats "
    "after warm-up; p95 tok/s: speed at the 95th-percentile inter-token latency (the slow tail).",
    "peak RSS: maximum resident memory of the process that loaded and ran the artifact (each artifact has its own).",
    "(gate failed): the artifact missed its parity gate at export (`ftedge export`); it is benched anyway.",
    "fits: size and peak RSS within the target's max_size_mb / max_ram_mb (MB = 2^20 bytes).",
]


def columns(doc: BenchResults, *, terminal: bool = False) -> list[tuple[str, str, Callable[[Any], str], bool]]:
    """COLUMNS, without the optional ones no artifact has a value for (nor, in the terminal, the report-only ones)."""
    return [
        c
        for c in COLUMNS
        if (c[0] not in OPTIONAL or any(e.value(c[0]) is not None for e in doc.artifacts)) and not (terminal and c[0] in REPORT_ONLY)
    ]


def cells(entry: Entry, cols: list[tuple[str, str, Callable[[Any], str], bool]] | None = None) -> list[str]:
    cols = COLUMNS if cols is None else cols
    row = [fmt(entry.value(key)) for key, _, fmt, _ in cols]
    if not entry.ok:
        row[1:] = ["failed"] + ["—"] * (len(cols) - 2)
    elif entry.reference:
        row[0] += " (ref)"
    if entry.gate_passed is False:
        row[0] += " (gate failed)"
    return row


def table(doc: BenchResults) -> Any:
    from rich.table import Table

    tab = Table(title=f"ftedge bench — target {doc.target.name} ({doc.target.threads} threads)", title_justify="left")
    cols = columns(doc, terminal=True)
    for _, header, _, right in cols:
        tab.add_column(header, justify="right" if right else "left", no_wrap=True)
    for entry in doc.artifacts:
        style = "red" if not entry.ok else ("yellow" if entry.fits is False else None)
        tab.add_row(*cells(entry, cols), style=style)
    return tab


def drift_line(doc: BenchResults) -> str | None:
    """One line on the drift-from-base figures: the base, its general-text perplexity, or why there are none."""
    base = doc.drift_base
    if base is None:
        return None
    if base.status != "ok":
        return f"drift from base: not measured ({base.error})"
    ppl = base.general_ppl
    return (
        f"drift from base: against the untuned base `{base.model}` on {base.general_prompts} general prompts "
        f"({base.answer_tokens} answer tokens) and {base.general_texts} texts; the base's general-text perplexity "
        + ("—" if ppl is None else f"{ppl:.2f}")
    )


def print_table(doc: BenchResults, console: Any | None = None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(width=180)
    console.print(table(doc))
    line = drift_line(doc)
    if line:
        console.print(line, markup=False, highlight=False)
    decision = doc.ship_decision
    if decision is not None:
        console.print(decision.summary, markup=False, highlight=False)
        for c in decision.candidates:
            if c.verdict != "reference":
                console.print(f"  {c.name}: {c.verdict}: {c.reason}", markup=False, highlight=False)
    for entry in doc.artifacts:
        if not entry.ok:
            console.print(f"[red]{entry.name} failed:[/red] {entry.error}", markup=True, highlight=False)


def _rows(doc: BenchResults) -> str:
    """Which rows were scored: the test split (never trained, validated, gated or calibrated on) or a user's file."""
    ev = doc.eval
    if ev.split == "test":
        unseen = "unseen by training, validation, the gates and calibration"
        return f"{ev.n_examples} of the {ev.n_available} rows of the **test** split ({unseen})"
    if ev.split == "file":
        return f"{ev.n_examples} rows of `{ev.data}`"
    return f"{ev.n_examples} examples"


def _runtime(rt: dict[str, Any] | None) -> str:
    if not rt:
        return "—"
    return f"flash attention {rt.get('flash_attn')}, weight repacking {rt.get('repack')} (per artifact in results.json)"


def markdown(doc: BenchResults) -> str:
    target, speed, host = doc.target, doc.speed, doc.host
    cols = columns(doc)
    lines = [
        "# ftedge bench report",
        "",
        f"- subject: `{doc.subject}`",
        f"- target: **{target.name}** — {target.threads} threads, n_ctx {target.n_ctx}, "
        f"max size {target.max_size_mb or '—'} MB, max RAM {target.max_ram_mb or '—'} MB",
        f"- quality: task `{doc.eval.task or 'none (speed only)'}`, {_rows(doc)}"
        + (f", reference **{doc.reference}**" if doc.reference else ""),
        f"- llama.cpp: {_runtime(target.runtime)}",
        f"- speed: greedy, {speed.prompt_tokens or '?'}-token prompt, {speed.decode_tokens} decoded tokens, "
        f"{speed.repeats} repeats after {speed.warmup} warm-up",
        f"- host: {host.cpu} ({host.cpus} CPUs), {host.platform}",
        f"- ftedge {doc.ftedge_version}, {doc.created}",
        "",
        "| " + " | ".join(h for _, h, _, _ in cols) + " |",
        "|" + "|".join("---:" if right else "---" for _, _, _, right in cols) + "|",
    ]
    for entry in doc.artifacts:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(entry, cols)) + " |")
    failed = [e for e in doc.artifacts if not e.ok]
    if failed:
        lines += ["", "## Failed", ""]
        lines += [f"- **{e.name}** (`{e.path}`): {e.error}" for e in failed]
    mismatched = [e for e in doc.artifacts if e.tokenization_mismatches]
    if mismatched:
        lines += ["", "## Tokenization differences", ""]
        lines += [
            f"- {e.name}: {e.tokenization_mismatches} examples tokenized differently from the reference (left out of top-1/KL)"
            for e in mismatched
        ]
    lines += classification_section(doc) + drift_section(doc) + generations_section(doc)
    if doc.ship_decision is not None:
        from ftedge.choose import decision_markdown

        lines += ["", "## Ship decision (`ship: auto`)", ""] + decision_markdown(doc.ship_decision)
    lines += ["", "## How to read it", ""] + [f"- {n}" for n in NOTES] + ["", "![accuracy vs decode speed](plot.png)", ""]
    return "\n".join(lines)


def md_cell(text: Any) -> str:
    """Text for a markdown table cell: pipes escaped, newlines as <br>."""
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def classification_section(doc: BenchResults, movers: int = 5, pairs: int = 5) -> list[str]:
    """Labels whose F1 moved most against the reference, and the most confused label pairs, per artifact."""
    from ftedge.bench.metrics import f1_movers

    ok = [e for e in doc.artifacts if e.ok and e.per_label]
    if not ok:
        return []
    ref = next((e for e in ok if e.reference), None)
    lines = ["", "## Per label", ""]
    if ref is not None:
        lines += [f"### Labels whose F1 moved most against the reference ({ref.name})", ""]
        for e in ok:
            if e is ref:
                continue
            moved = f1_movers(ref.per_label or {}, e.per_label or {}, movers)
            if not moved:
                lines += [f"- **{e.name}**: no label's F1 changed.", ""]
                continue
            lines += [f"**{e.name}**", "", "| label | reference F1 | F1 | change | support |", "|---|---:|---:|---:|---:|"]
            lines += [
                f"| {md_cell(m['label'])} | {m['reference_f1']:.3f} | {m['f1']:.3f} | {m['delta']:+.3f} | {m['support']} |" for m in moved
            ]
            lines.append("")
    lines += ["### Most confused label pairs (gold → answer, count)", ""]
    for e in ok:
        conf = (e.confusions or [])[:pairs]
        shown = ", ".join(f"`{md_cell(c['gold'])}` → `{md_cell(c['predicted'] or '(empty)')}` ({c['count']})" for c in conf) or "none"
        lines.append(f"- **{e.name}**: {shown}")
    return lines


def drift_section(doc: BenchResults) -> list[str]:
    from ftedge.bench.forgetting import NOTE

    line = drift_line(doc)
    if not line or doc.drift_base is None:
        return []
    lines = ["", "## Drift from base", "", line + ".", ""]
    ok = [e for e in doc.artifacts if e.ok and e.drift_kl is not None]
    if ok:
        base_ppl = doc.drift_base.general_ppl
        lines += ["| artifact | drift KL | drift top-1 | gen. ppl | vs base |", "|---|---:|---:|---:|---:|"]
        for e in ok:
            ppl = e.general_ppl
            ratio = f"{ppl / base_ppl:.2f}x" if ppl and base_ppl else "—"
            lines.append(f"| {e.name} | {_kl(e.drift_kl)} | {_pct(e.drift_top1)} | {_num(2)(ppl)} | {ratio} |")
        lines.append("")
    return lines + [NOTE]


def generations_section(doc: BenchResults) -> list[str]:
    """Each test prompt with its reference answer and every artifact's greedy answer, side by side."""
    ok = [e for e in doc.artifacts if e.ok and e.generations]
    if not ok:
        return []
    lines = ["", "## Answers side by side", ""]
    lines.append(
        "chrF against the reference answers (95% bootstrap interval): "
        + "; ".join(f"**{e.name}** {e.chrf or 0.0:.1f}" + (f" [{e.chrf_ci[0]:.1f}, {e.chrf_ci[1]:.1f}]" if e.chrf_ci else "") for e in ok)
        + "."
    )
    first = ok[0].generations or []
    for i, g in enumerate(first):
        lines += [
            "",
            f"### {i + 1}. {md_cell(g['prompt'])}",
            "",
            "| | answer | chrF |",
            "|---|---|---:|",
            f"| reference | {md_cell(g['reference'])} | |",
        ]
        for e in ok:
            gens = e.generations or []
            if i < len(gens) and gens[i]["prompt"] == g["prompt"]:
                lines.append(f"| {e.name} | {md_cell(gens[i]['answer']) or '(empty)'} | {gens[i]['chrf']:.1f} |")
    return lines


def _plot_axis(entries: list[Entry]) -> tuple[str, str]:
    for key, label in (("accuracy", "accuracy"), ("perplexity", "perplexity (lower is better)"), ("size_bytes", "size (MB)")):
        if any(e.value(key) is not None for e in entries):
            return key, label
    return "size_bytes", "size (MB)"


MIN_AREA, MAX_AREA = 30.0, 600.0  # marker areas (points^2) of the smallest and the largest artifact


def plot_points(doc: BenchResults) -> tuple[str, str, list[dict[str, Any]]]:
    """(metric key, axis label, points): each benched artifact at (decode tok/s, metric), its 95% interval as
    error-bar lengths (below, above) and its size as marker area (linear in bytes, MIN_AREA..MAX_AREA)."""
    ok = [e for e in doc.artifacts if e.ok and e.decode_tok_s is not None]
    key, label = _plot_axis(ok)
    chosen = [e for e in ok if e.value(key) is not None]
    biggest = max((e.size_bytes or 0 for e in chosen), default=0) or 1
    points = []
    for e in sorted(chosen, key=lambda e: e.decode_tok_s or 0.0):
        y = e.value(key) / MB if key == "size_bytes" else e.value(key)
        ci = e.value(f"{key}_ci") if f"{key}_ci" in Entry.model_fields else None
        low, high = (max(y - ci[0], 0.0), max(ci[1] - y, 0.0)) if ci else (0.0, 0.0)
        size = e.size_bytes or 0
        points.append(
            {
                "name": e.name,
                "x": e.decode_tok_s,
                "y": y,
                "yerr": (low, high),
                "area": MIN_AREA + (MAX_AREA - MIN_AREA) * size / biggest,
                "marker": "*" if e.reference else ("o" if e.fits is not False else "X"),
                "size_mb": size / MB,
            }
        )
    return key, label, points


def plot_png(doc: BenchResults) -> bytes:
    """Accuracy (else perplexity) against decode tok/s: 95% intervals as error bars, marker area as the artifact's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, points = plot_points(doc)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        span = max((p["x"] for p in points), default=1.0) or 1.0
        last_x, flip = None, False
        for p in points:
            x, y = p["x"], p["y"]
            if any(p["yerr"]):
                ax.errorbar(x, y, yerr=[[p["yerr"][0]], [p["yerr"][1]]], fmt="none", ecolor="0.35", elinewidth=1, capsize=4, zorder=2)
            ax.scatter(x, y, s=p["area"] * (1.6 if p["marker"] == "*" else 1.0), marker=p["marker"], alpha=0.75, zorder=3)
            flip = (not flip) if last_x is not None and x - last_x < 0.12 * span else False  # neighbours: labels above / below
            last_x = x
            gap = (p["area"] / 3.14159) ** 0.5 + 3  # points: each label starts beside its marker, whatever the marker's size
            text = f"{p['name']} ({p['size_mb']:,.0f} MB)"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(gap, -13 if flip else 5), fontsize=8)
        failed = [e.name for e in doc.artifacts if not e.ok]
        if failed:
            ax.text(0.01, 0.01, "failed: " + ", ".join(failed), transform=ax.transAxes, fontsize=7, color="red", va="bottom")
        note = "marker area: artifact size; * reference, X over budget" + (
            "; bars: 95% bootstrap interval" if any(any(p["yerr"]) for p in points) else ""
        )
        ax.text(0.99, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.3", ha="right", va="bottom")
        target = doc.target
        ax.set_xlabel(f"decode tok/s (median, {target.threads} threads)")
        ax.set_ylabel(label)
        if key == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"ftedge bench — {target.name}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_reports(doc: BenchResults, out_dir: Path, *, predictions: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Path]:
    """Write results.json (through ``ftedge.results``), report.md, plot.png (and predictions.json when given) into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"results": out_dir / "results.json", "report": out_dir / "report.md", "plot": out_dir / "plot.png"}
    write_results(doc, paths["results"])
    atomic.write_text(paths["report"], markdown(doc))
    atomic.write_bytes(paths["plot"], plot_png(doc))
    if predictions:
        paths["predictions"] = out_dir / "predictions.json"
        atomic.write_text(paths["predictions"], json.dumps(predictions, indent=1, ensure_ascii=False) + "\n")
    return paths
