"""The export stage: GGUF and ONNX artifacts of a target profile, each through the parity gate.

For each ``target.gguf.quants`` (the f16 GGUF is built first: it is the source of every
quantization and recorded as ``gguf-f16``) and each ``target.onnx.precisions``: build the
artifact atomically, gate it against the merged PyTorch model (``ftedge.export.gate``), and record it
as ``gguf-<quant>`` / ``onnx-<precision>`` with ``format``, ``quant``, ``status`` and ``gate``
{kl, kl_p99, top1_confident, top1 (raw), passed, reasons, thresholds, runtime, n_prompts, ...}. The gate
prompts are validation rows of the splits frozen into the run at train time (``ftedge.data.splits.run_splits``); GPTQ
calibrates on training rows only (``calibration_texts``), so no
artifact is judged on the text it was fitted to, and the bench's test rows stay unseen by both.

A failing artifact is kept on disk and recorded with ``status: failed`` and its figures; after every artifact is processed the stage raises
``GateFailedError`` naming the failures (exit code 3). An Ollama ``Modelfile`` is written beside
the GGUFs. Finished artifacts are skipped unless ``force``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ftedge.errors import DiskError, FtedgeError, GateFailedError
from ftedge.formats.quants import GGUF_CONVERTER_TYPES, check_gguf_type
from ftedge.manifest import Run
from ftedge.recipe import require_mergeable
from ftedge.targets import Target

log = logging.getLogger(__name__)

GATE_PROMPTS = 16
CALIBRATION_TEXTS = 16


def calibration_texts(splits: Any, tokenizer: Any, n: int = CALIBRATION_TEXTS) -> list[str]:
    """The first ``n`` training rows of ``splits``, chat-formatted (prompt, answer and end-of-turn; raw text as is) for GPTQ:
    never validation or test rows."""
    from ftedge.data.prompts import Prompt
    from ftedge.families import end_of_turn_id

    eot = end_of_turn_id(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(eot) if eot is not None else None
    return [ex.target if ex.raw else Prompt(list(ex.messages), ex.target).text(tokenizer, eot=eot_text) for ex in splits.train[:n]]


class _Exporter:
    """State shared by the artifacts of one export: the run, target and (lazily) the reference."""

    def __init__(self, run: Run, target: Target, force: bool) -> None:
        self.run, self.target, self.force = run, target, force
        self.merged = run.artifact_path("merged")
        if not (self.merged / "config.json").is_file():
            raise FtedgeError(f"merged model {self.merged} is missing or incomplete", hint=f"run `ftedge merge {run.path} --force`")
        from ftedge.families import end_of_turn_id
        from ftedge.loader import load_tokenizer

        self.tokenizer = load_tokenizer(self.merged, trust_remote_code=run.recipe().trust_remote_code)
        self.end_of_turn = end_of_turn_id(self.tokenizer)
        from ftedge.data.splits import run_splits

        self.splits = run_splits(run)  # frozen at train time: refused in one line if the data file changed since
        self._reference: Any = None
        self.summary: dict[str, dict[str, Any]] = {}
        self.failed: list[str] = []

    @property
    def reference(self) -> Any:
        if self._reference is None:
            from ftedge.data.prompts import gate_prompts
            from ftedge.export.gate import build_reference

            t0 = time.time()
            prompts = gate_prompts(self.splits, self.run.recipe(), GATE_PROMPTS)
            self._reference = build_reference(self.merged, prompts, threads=self.target.threads)
            log.info("parity reference: %d prompts in %.1fs", len(prompts), time.time() - t0)
        return self._reference

    def gate_and_record(self, key: str, path: Path, *, fmt: str, quant: str, build_seconds: float, **extra: Any) -> None:
        from ftedge.export.gate import gate_artifact

        t0 = time.time()
        gate = gate_artifact(path, self.reference, quant, target=self.target, threads=self.target.threads, n_ctx=self.target.n_ctx)
        gate["seconds"] = round(time.time() - t0, 2)
        status = "passed" if gate["passed"] else "failed"
        self.run.record_artifact(
            key, path, stage="export", format=fmt, quant=quant, status=status, gate=gate, build_seconds=round(build_seconds, 2), **extra
        )
        self._note(key, gate, status)

    def _note(self, key: str, gate: dict[str, Any], status: str) -> None:
        self.summary[key] = {"status": status, **{k: gate.get(k) for k in ("kl", "kl_p99", "top1_confident", "top1", "reasons")}}
        if status == "failed":
            self.failed.append(key)
            log.warning("%s FAILED its parity gate: %s", key, "; ".join(gate.get("reasons", [])))
        else:
            log.info("%s passed: %s", key, gate_line(gate))

    def record_error(self, key: str, err: FtedgeError) -> None:
        self.summary[key] = {"status": "error", "error": err.one_line()}
        self.failed.append(key)
        log.error("%s: %s", key, err.one_line())

    def reuse(self, key: str) -> bool:
        """A finished (gated) artifact of an earlier export is kept unless ``force``."""
        art = self.run.artifact(key)
        if self.force or art is None or art.gate_passed is None or not art.path.exists():
            return False
        status = "passed" if art.gate_passed else "failed"
        log.info("%s already exported (%s); use --force to redo it", key, status)
        self._note(key, art.gate or {}, status)
        return True

    # -- GGUF -------------------------------------------------------------------------
    def export_gguf(self, quants: list[str]) -> None:
        from ftedge.export import gguf as g

        quants = [check_gguf_type(q) for q in quants]
        out_dir = self.run.path / "gguf"
        f16 = out_dir / "model-f16.gguf"
        eot = self.end_of_turn
        if not self.reuse("gguf-f16"):
            t0 = time.time()
            _, meta = g.build_f16(self.merged, f16, end_of_turn=eot)
            self.gate_and_record("gguf-f16", f16, fmt="gguf", quant="f16", build_seconds=time.time() - t0, metadata=meta)
        for q in quants:
            key = f"gguf-{q}"
            if q == "f16" or self.reuse(key):
                continue
            path = out_dir / f"model-{q}.gguf"
            t0 = time.time()
            try:
                if q in GGUF_CONVERTER_TYPES:
                    g.convert_to_gguf(self.merged, path, outtype=q)
                    extra: dict[str, Any] = {"metadata": g.check_metadata(g.inspect_gguf(path), end_of_turn_id=eot)}
                else:
                    _, report, meta = g.build_quant(f16, path, q, end_of_turn=eot, threads=self.target.threads)
                    extra = {"metadata": meta, **report.summary()}
            except DiskError:  # no space, read-only, no permission: the next artifact would fail too
                raise
            except FtedgeError as err:
                self.record_error(key, err)
                continue
            self.gate_and_record(key, path, fmt="gguf", quant=q, build_seconds=time.time() - t0, **extra)
        self.write_modelfile(out_dir)

    def write_modelfile(self, out_dir: Path) -> None:
        from ftedge.choose import best
        from ftedge.formats.modelfile import write_modelfile

        chosen = best(self.run, "gguf", self.target)  # the target's named ship type, its quants in order, then f16
        if chosen is None:
            log.warning("no GGUF passed its gate: no Modelfile written")
            return
        system = self.run.recipe().data.system_prompt
        stops = write_modelfile(chosen.path, out_dir / "Modelfile", system=system, model_ref=f"./{chosen.path.name}")
        self.run.record_artifact("modelfile", out_dir / "Modelfile", stage="export", format="ollama", source=chosen.key, stop=stops)

    # -- ONNX -------------------------------------------------------------------------
    def export_onnx(self, precisions: list[str]) -> None:
        from ftedge.export.onnx import export_onnx

        texts: list[str] | None = None  # read from the splits once, for the first precision built
        for p in precisions:
            key = f"onnx-{p}"
            if self.reuse(key):
                continue
            out = self.run.path / "onnx" / p
            t0 = time.time()
            try:
                texts = texts if texts is not None else calibration_texts(self.splits, self.tokenizer)
                export_onnx(self.merged, out, p, calibration_texts=texts)
            except DiskError:  # no space, read-only, no permission: the next artifact would fail too
                raise
            except FtedgeError as err:
                self.record_error(key, err)
                continue
            self.gate_and_record(key, out, fmt="onnx", quant=p, build_seconds=time.time() - t0)


def gate_line(gate: dict[str, Any]) -> str:
    """A gate's figures in one line: mean / p99 KL, top-1 on confident positions, raw top-1."""
    conf = gate.get("top1_confident")
    conf_text = "n/a" if conf is None else f"{conf:.3f} on {gate.get('confident_positions')} confident positions"
    return f"KL {gate.get('kl', 0):.4f} (p99 {gate.get('kl_p99', 0):.4f}), top-1 {conf_text} ({gate.get('top1', 0):.3f} raw)"


def export_stage(run: Run, target: Target, *, force: bool = False) -> None:
    """Build, gate and record every artifact of ``target``; raise GateFailedError naming failures."""
    require_mergeable(run.recipe(), "export")
    run.require("merge", "merged model", "ftedge merge")
    ex = _Exporter(run, target, force)
    with run.stage("export") as metrics:
        metrics["target"] = target.name
        if target.gguf and target.gguf.quants:
            ex.export_gguf(list(target.gguf.quants))
        if target.onnx and target.onnx.precisions:
            ex.export_onnx(list(target.onnx.precisions))
        metrics["artifacts"] = ex.summary
        if ex.failed:
            details = []
            for key in ex.failed:
                s = ex.summary[key]
                details.append(f"{key} ({s['error']})" if s["status"] == "error" else f"{key} ({', '.join(s.get('reasons') or [])})")
            raise GateFailedError(
                f"{len(ex.failed)} artifact(s) failed: {'; '.join(details)}",
                hint=f"see the gate figures in {run.manifest_path}; artifacts that passed are usable",
            )
