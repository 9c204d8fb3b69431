"""GPTQ 4-bit weight quantization (Frantar et al., 2022) in PyTorch, written into MatMulNBits weights.

The ORT GenAI builder quantizes with round-to-nearest (RTN); on small models that costs a lot of
accuracy. Here every MatMulNBits weight the builder made is re-quantized with GPTQ on the same
grid (block size along K, one scale and zero point per block and output row), using Hessians
``X^T X`` of each linear layer's inputs collected from the float model on calibration text.
Only the values of the builder's initializers change; the graph stays the builder's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ftedge.families import projection_parts

log = logging.getLogger(__name__)

# builder node name -> HF submodules whose weights are stacked along the output dimension (ftedge.families.projection_parts)
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)/MatMul")


def hf_modules_for(node_name: str) -> list[str] | None:
    """HF module paths (``model.layers.I.self_attn.q_proj`` ...) behind a builder MatMul node, or None."""
    m = _NODE.match(node_name)
    parts = projection_parts(m.group(3)) if m else None
    if m is None or parts is None:
        return None
    return [f"model.layers.{m.group(1)}.{p}" for p in parts]


MAX_CALIBRATION_TOKENS = 6144  # enough for 576..1536-wide layers; the Hessians cost ~ tokens * K^2


def collect_hessians(
    model, tokenizer, texts: Sequence[str], modules: set[str], *, max_tokens: int = 512, max_total: int = MAX_CALIBRATION_TOKENS
) -> dict[str, np.ndarray]:
    """``2 X^T X / n`` of the inputs of the named linear modules over the calibration texts (float32 sums)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    named = dict(model.named_modules())
    for name in modules:
        hooks.append(named[name].register_forward_hook(hook(name)))
    try:
        total = 0
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : min(max_tokens, max_total - total)]
                if ids.shape[1]:
                    model(input_ids=ids)
                    total += ids.shape[1]
                if total >= max_total:
                    break
        log.info("GPTQ calibration: %d tokens", total)
    finally:
        for h in hooks:
            h.remove()
    return {n: (2.0 * sums[n].double() / counts[n]).numpy() for n in sums}


def gptq(
    weight: np.ndarray, hessian: np.ndarray, *, block_size: int, symmetric: bool, percdamp: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``weight`` [N, K] to 4 bits in blocks of ``block_size`` along K (numpy, float64).

    Returns (q uint8 [N, K] in 0..15, scales float32 [N, K/bs], zero points uint8 [N, K/bs]);
    the dequantized weight is ``(q - zp) * scale`` (zero point 8 when symmetric). Each block's
    scale and zero point come from the block's error-compensated weights when it is reached.
    """
    W = np.array(weight, dtype=np.float64)
    H = np.array(hessian, dtype=np.float64)
    N, K = W.shape
    nb = K // block_size
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky((Hinv + Hinv.T) / 2).T  # upper Cholesky factor of H^-1

    Q = np.zeros((N, K), dtype=np.uint8)
    scales = np.zeros((N, nb), dtype=np.float64)
    zps = np.zeros((N, nb), dtype=np.uint8)
    for b in range(nb):
        i0, i1 = b * block_size, (b + 1) * block_size
        W1 = W[:, i0:i1].copy()
        if symmetric:
            s = np.abs(W1).max(axis=1) / 7.0
            s[s == 0] = 1.0
            z = np.full(N, 8.0)
        else:
            lo = np.minimum(W1.min(axis=1), 0.0)
            hi = np.maximum(W1.max(axis=1), 0.0)
            s = (hi - lo) / 15.0
            s[s == 0] = 1.0
            z = np.clip(np.round(-lo / s), 0, 15)
        scales[:, b] = s
        zps[:, b] = z.astype(np.uint8)
        U1 = U[i0:i1, i0:i1]
        Err1 = np.zeros_like(W1)
        for j in range(block_size):
            w = W1[:, j]
            q = np.clip(np.round(w / s) + z, 0, 15)
            Q[:, i0 + j] = q.astype(np.uint8)
            err = (w - (q - z) * s) / U1[j, j]
            W1[:, j:] -= np.outer(err, U1[j, j:])
            Err1[:, j] = err
        W[:, i1:] -= Err1 @ U[i0:i1, i1:]
    return Q, scales.astype(np.float32), zps


def pack_nibbles(q: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] 0..15 -> MatMulNBits B layout [N, K/bs, bs/2] (element 2j in the low nibble)."""
    N, K = q.shape
    q = q.reshape(N, K // block_size, block_size // 2, 2)
    return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray, n: int, k: int) -> np.ndarray:
    flat = b.reshape(n, -1)
    out = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :k]


def pack_zero_points(z: np.ndarray) -> np.ndarray:
    """[N, nb] 0..15 -> [N, ceil(nb/2)] (block 2j in the low nibble)."""
    N, nb = z.shape
    if nb % 2:
        z = np.concatenate([z, np.zeros((N, 1), dtype=z.dtype)], axis=1)
    z = z.reshape(N, -1, 2)
    return (z[..., 0] | (z[..., 1] << 4)).astype(np.uint8)


def dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int, k: int, block_size: int) -> np.ndarray:
    """Float weight [N, K] of a 4-bit MatMulNBits node."""
    q = unpack_nibbles(b, n, k).astype(np.float32)
    nb = -(-k // block_size)
    s = scales.reshape(n, nb)
    z = np.full((n, nb), 8.0, dtype=np.float32) if zero_points is None else unpack_nibbles(zero_points, n, nb).astype(np.float32)
    return (q - np.repeat(z, block_size, axis=1)[:, :k]) * np.repeat(s, block_size, axis=1)[:, :k]


def requantize_onnx(onnx_dir: Path, hf_dir: Path, texts: Sequence[str], *, threads: int | None = None, progress=None) -> dict[str, int]:
    """Re-quantize the 4-bit MatMulNBits weights of the builder's ``onnx_dir/model.onnx`` with GPTQ.

    Nodes that cannot be matched to an HF module (name or shape) keep their RTN weights.
    Returns counts {"gptq": n, "kept": m}.
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    model_path = onnx_dir / "model.onnx"
    proto = onnx.load(str(model_path), load_external_data=True)
    inits = {i.name: i for i in proto.graph.initializer}
    targets = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits") != 4:
            continue
        mods = hf_modules_for(node.name)
        if mods is None:
            log.info("GPTQ: keeping RTN weights of %s (no HF module)", node.name)
            continue
        targets.append((node, attrs, mods))
    if not targets:
        return {"gptq": 0, "kept": 0}

    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    first = sorted({mods[0] for _, _, mods in targets})
    hessians = collect_hessians(hf, tok, texts, set(first))
    named = dict(hf.named_modules())
    done = kept = 0
    for node, attrs, mods in targets:
        n, k, bs = int(attrs["N"]), int(attrs["K"]), int(attrs["block_size"])
        w = torch.cat([named[m].weight.detach().float() for m in mods], dim=0).numpy()
        names = list(node.input) + [""] * 4
        b_init, s_init, z_init = inits.get(names[1]), inits.get(names[2]), inits.get(names[3]) if names[3] else None
        if w.shape != (n, k) or k % bs or b_init is None or s_init is None or mods[0] not in hessians:
            log.info("GPTQ: keeping RTN weights of %s (shape or inputs do not match)", node.name)
            kept += 1
            continue
        old_b, old_s = numpy_helper.to_array(b_init), numpy_helper.to_array(s_init)
        old_z = numpy_helper.to_array(z_init) if z_init is not None else None
        rtn = dequantize(old_b, old_s, old_z, n, k, bs)
        rel = float(np.linalg.norm(rtn - w) / (np.linalg.norm(w) + 1e-12))
        if rel > 0.5:  # the builder's weight is not this HF module's: never write a wrong matrix
            log.warning("GPTQ: %s does not match %s (relative error %.2f); keeping RTN weights", node.name, mods, rel)
            kept += 1
            continue
        q, s, z = gptq(w, hessians[mods[0]], block_size=bs, symmetric=z_init is None)
        b_init.CopyFrom(numpy_helper.from_array(pack_nibbles(q, bs).reshape(old_b.shape), b_init.name))
        s_init.CopyFrom(numpy_helper.from_array(s.reshape(old_s.shape).astype(old_s.dtype), s_init.name))
        if z_init is not None:
            z_init.CopyFrom(numpy_helper.from_array(pack_zero_points(z).reshape(old_z.shape), z_init.name))
        done += 1
        if progress is not None:
            progress()
    data_name = model_path.name + ".data"
    for f in (model_path, onnx_dir / data_name):
        f.unlink(missing_ok=True)
    onnx.save_model(
        proto, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    return {"gptq": done, "kept": kept}
