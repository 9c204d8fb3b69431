"""Bench results for people: a rich terminal table, ``report.md``, ``results.json`` and ``plot.png``."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftedge import atomic

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


# (key, header, formatter, right-aligned)
COLUMNS: list[tuple[str, str, Callable[[Any], str], bool]] = [
    ("name", "artifact", str, False),
    ("quant", "quant", lambda v: v or "—", False),
    ("size_bytes", "size MB", _size, True),
    ("accuracy", "accuracy", _pct, True),
    ("perplexity", "ppl", _num(3), True),
    ("top1_agreement", "top-1", _pct, True),
    ("kl", "KL", _kl, True),
    ("ttft_ms", "TTFT ms", _num(1), True),
    ("prefill_tok_s", "prefill tok/s", _num(1), True),
    ("decode_tok_s", "decode tok/s", _num(1), True),
    ("decode_tok_s_p95", "p95 tok/s", _num(1), True),
    ("peak_rss_mb", "peak RSS MB", _num(0), True),
    ("fits", "fits", _fits, False),
]

NOTES = [
    "accuracy: the greedy answer equals the label after trimming; every answer is what token-by-token decoding gives "
    "(budget: the longest label in tokens + 8).",
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


def cells(entry: dict[str, Any]) -> list[str]:
    row = [fmt(entry.get(key)) for key, _, fmt, _ in COLUMNS]
    if entry.get("status") == "failed":
        row[1:] = ["failed"] + ["—"] * (len(COLUMNS) - 2)
    elif entry.get("reference"):
        row[0] += " (ref)"
    if entry.get("gate_passed") is False:
        row[0] += " (gate failed)"
    return row


def table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    target = doc.get("target", {})
    tab = Table(title=f"ftedge bench — target {target.get('name')} ({target.get('threads')} threads)", title_justify="left")
    for _, header, _, right in COLUMNS:
        tab.add_column(header, justify="right" if right else "left", no_wrap=True)
    for entry in doc["artifacts"]:
        style = "red" if entry.get("status") == "failed" else ("yellow" if entry.get("fits") is False else None)
        tab.add_row(*cells(entry), style=style)
    return tab


def print_table(doc: dict[str, Any], console: Any | None = None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(width=180)
    console.print(table(doc))
    for entry in doc["artifacts"]:
        if entry.get("status") == "failed":
            console.print(f"[red]{entry['name']} failed:[/red] {entry.get('error')}", markup=True, highlight=False)


def _rows(ev: dict[str, Any]) -> str:
    """Which rows were scored: the test split (never trained, validated, gated or calibrated on) or a user's file."""
    n, total = ev.get("n_examples", 0), ev.get("n_available")
    if ev.get("split") == "test":
        return f"{n} of the {total} rows of the **test** split (unseen by training, validation, the gates and calibration)"
    if ev.get("split") == "file":
        return f"{n} rows of `{ev.get('data')}`"
    return f"{n} examples"


def _runtime(rt: dict[str, Any] | None) -> str:
    if not rt:
        return "—"
    return f"flash attention {rt.get('flash_attn')}, weight repacking {rt.get('repack')} (per artifact in results.json)"


def markdown(doc: dict[str, Any]) -> str:
    target, ev, speed, host = doc.get("target", {}), doc.get("eval", {}), doc.get("speed", {}), doc.get("host", {})
    lines = [
        "# ftedge bench report",
        "",
        f"- subject: `{doc.get('subject')}`",
        f"- target: **{target.get('name')}** — {target.get('threads')} threads, n_ctx {target.get('n_ctx')}, "
        f"max size {target.get('max_size_mb') or '—'} MB, max RAM {target.get('max_ram_mb') or '—'} MB",
        f"- quality: task `{ev.get('task') or 'none (speed only)'}`, {_rows(ev)}"
        + (f", reference **{doc['reference']}**" if doc.get("reference") else ""),
        f"- llama.cpp: {_runtime(target.get('runtime'))}",
        f"- speed: greedy, {speed.get('prompt_tokens') or '?'}-token prompt, {speed.get('decode_tokens')} decoded tokens, "
        f"{speed.get('repeats')} repeats after {speed.get('warmup')} warm-up",
        f"- host: {host.get('cpu')} ({host.get('cpus')} CPUs), {host.get('platform')}",
        f"- ftedge {doc.get('ftedge_version')}, {doc.get('created')}",
        "",
        "| " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---:" if right else "---" for _, _, _, right in COLUMNS) + "|",
    ]
    for entry in doc["artifacts"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(entry)) + " |")
    failed = [e for e in doc["artifacts"] if e.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed", ""]
        lines += [f"- **{e['name']}** (`{e.get('path')}`): {e.get('error')}" for e in failed]
    mismatched = [e for e in doc["artifacts"] if e.get("tokenization_mismatches")]
    if mismatched:
        lines += ["", "## Tokenization differences", ""]
        lines += [
            f"- {e['name']}: {e['tokenization_mismatches']} examples tokenized differently from the reference (left out of top-1/KL)"
            for e in mismatched
        ]
    lines += ["", "## How to read it", ""] + [f"- {n}" for n in NOTES] + ["", "![accuracy vs decode speed](plot.png)", ""]
    return "\n".join(lines)


def _plot_axis(entries: list[dict[str, Any]]) -> tuple[str, str]:
    for key, label in (("accuracy", "accuracy"), ("perplexity", "perplexity (lower is better)"), ("size_bytes", "size (MB)")):
        if any(e.get(key) is not None for e in entries):
            return key, label
    return "size_bytes", "size (MB)"


def plot_png(doc: dict[str, Any]) -> bytes:
    """Accuracy (else perplexity) against decode tok/s, one labelled point per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in doc["artifacts"] if e.get("status") == "ok" and e.get("decode_tok_s") is not None]
    key, label = _plot_axis(ok)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        points = sorted((e for e in ok if e.get(key) is not None), key=lambda e: e["decode_tok_s"])
        span = max((e["decode_tok_s"] for e in points), default=1.0) or 1.0
        last_x, flip = None, False
        for e in points:
            x, y = e["decode_tok_s"], e[key] / MB if key == "size_bytes" else e[key]
            marker = "*" if e.get("reference") else ("o" if e.get("fits") is not False else "x")
            ax.scatter(x, y, s=90 if marker == "*" else 45, marker=marker, zorder=3)
            flip = (not flip) if last_x is not None and x - last_x < 0.12 * span else False  # neighbours: labels above / below
            last_x = x
            ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(6, -12 if flip else 5), fontsize=8)
        failed = [e["name"] for e in doc["artifacts"] if e.get("status") != "ok"]
        if failed:
            ax.text(0.01, 0.01, "failed: " + ", ".join(failed), transform=ax.transAxes, fontsize=7, color="red", va="bottom")
        target = doc.get("target", {})
        ax.set_xlabel(f"decode tok/s (median, {target.get('threads')} threads)")
        ax.set_ylabel(label)
        if key == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"ftedge bench — {target.get('name')}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_reports(doc: dict[str, Any], out_dir: Path, *, predictions: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Path]:
    """Write results.json, report.md, plot.png (and predictions.json when given) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"results": out_dir / "results.json", "report": out_dir / "report.md", "plot": out_dir / "plot.png"}
    atomic.write_json(paths["results"], doc)
    atomic.write_text(paths["report"], markdown(doc))
    atomic.write_bytes(paths["plot"], plot_png(doc))
    if predictions:
        paths["predictions"] = out_dir / "predictions.json"
        atomic.write_text(paths["predictions"], json.dumps(predictions, indent=1, ensure_ascii=False) + "\n")
    return paths
