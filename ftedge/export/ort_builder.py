"""``python -m ftedge.export.ort_builder ARGS``: onnxruntime-genai's model builder, with the config fixes it needs.

onnxruntime-genai 0.18's builder reads a flat ``rope_parameters`` (``rope_type``, ``rope_theta``) and,
for Gemma 3, ``rope_local_base_freq``; transformers 5 gives Gemma 3 one ``rope_parameters`` entry per
layer type (``full_attention``, ``sliding_attention``), so the builder stops with ``KeyError: 'rope_type'``.
This entry point loads the config as the builder does, flattens it (global layers' rope as
``rope_parameters``, the sliding layers' theta as ``rope_local_base_freq``) and runs the builder's own
``__main__`` unchanged. Other architectures pass through untouched.
"""

from __future__ import annotations

import runpy
from typing import Any

LAYER_TYPE_ROPE = ("gemma3", "gemma3_text")  # model types whose per-layer-type rope the builder cannot read


def flatten_layer_type_rope(config: Any) -> Any:
    """Gemma 3's per-layer-type ``rope_parameters`` as the builder reads them (in place; returns ``config``)."""
    for cfg in (config, getattr(config, "text_config", None)):
        rope = getattr(cfg, "rope_parameters", None)
        if getattr(cfg, "model_type", None) not in LAYER_TYPE_ROPE or not isinstance(rope, dict) or "full_attention" not in rope:
            continue
        sliding = rope.get("sliding_attention") or {}
        cfg.rope_parameters = dict(rope["full_attention"])
        cfg.rope_local_base_freq = float(sliding.get("rope_theta", rope["full_attention"].get("rope_theta", 10000.0)))
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        return flatten_layer_type_rope(load(cls, *args, **kwargs))

    AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
