"""The recipe: what to tune, on what data, how, and where to ship it.

Pydantic models with ``extra="forbid"`` so unknown keys are errors; every field is
described (``ftedge validate --explain`` prints them). ``load_recipe`` applies
``KEY=VALUE`` overrides (dotted keys, YAML-typed values) before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftedge.errors import FtedgeError

DataFormat = Literal["messages", "alpaca", "completion", "text_label", "preference"]
AdapterMethod = Literal["lora", "dora", "ia3", "prefix"]
MERGEABLE_METHODS = ("lora", "dora", "ia3")  # adapters that merge exactly into the base weights


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    train: Path = Field(
        description=(
            "Training data file: .csv, .jsonl/.json, or a local HF-datasets folder/.parquet/.arrow file. Relative "
            "paths are resolved from the recipe's folder."
        )
    )
    val: Path | None = Field(
        None,
        description=(
            "Optional separate validation file (same format): early stopping, best checkpoint, parity-gate prompts. If unset, "
            "`val_fraction` of `train` is held out with a fixed seed."
        ),
    )
    test: Path | None = Field(
        None,
        description=(
            "Optional separate test file (same format), scored only by `ftedge bench`. If unset, `test_fraction` of `train` is "
            "held out with a fixed seed (before the validation rows, so changing `val_fraction` keeps the test rows)."
        ),
    )
    format: DataFormat = Field(
        "text_label",
        description=(
            "Row format: `messages` (role/content list), `alpaca` (instruction/input/output), `completion` "
            "(prompt/completion, or text), `text_label` (a text and a label; the label is the assistant's answer), `preference` "
            "(a prompt with a chosen and a rejected answer, for `train.objective: dpo`; the prompt is a string or a message list, "
            "or absent when `chosen`/`rejected` are whole conversations)."
        ),
    )
    text_field: str = Field(
        "text", description="Column holding the user text (`text_label`) or the raw text (`completion` without prompt)."
    )
    label_field: str = Field("label", description="Column holding the label (`text_label`): the answer the model learns to give.")
    messages_field: str = Field("messages", description="Column holding the chat turns (`messages`).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (`completion`).")
    completion_field: str = Field("completion", description="Column holding the completion (`completion`).")
    chosen_field: str = Field("chosen", description="Column holding the preferred answer (`preference`).")
    rejected_field: str = Field("rejected", description="Column holding the dispreferred answer (`preference`).")
    system_prompt: str | None = Field(
        None,
        description=(
            "System prompt put in front of every example (and used at inference/bench). Keep it short: it costs tokens on every row."
        ),
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of `train` held out for validation when `val` is not set (fixed seed)."
    )
    test_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "Fraction of `train` held out for the bench when `test` is not set (fixed seed); never trained, validated, gated or "
            "calibrated on."
        ),
    )
    max_examples: int | None = Field(
        None, gt=0, description="Use at most this many training rows (after the validation split); null = all."
    )
    seed: int = Field(0, description="Seed of the train/validation/test split and shuffling.")

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        held = (0.0 if self.val is not None else self.val_fraction) + (0.0 if self.test is not None else self.test_fraction)
        if held >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {held:g} leaves no training rows")
        return self


class AdapterConfig(_Strict):
    method: AdapterMethod = Field(
        "lora",
        description=(
            "Parameter-efficient method (peft): `lora`, `dora` (weight-decomposed LoRA), `ia3` (learned scaling vectors) "
            "merge exactly into the weights and export; `prefix` (prefix tuning: learned key/value prefixes) trains and benches "
            "in PyTorch only, it cannot be merged or exported. Ignored by `train.method: full`."
        ),
    )
    r: int = Field(16, gt=0, description="LoRA / DoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA / DoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA / DoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description=(
            "Modules to adapt: `all-linear` or a list of module names (e.g. [q_proj, v_proj]). For `ia3`, `all-linear` means "
            "peft's IA3 default for the architecture (attention k/v and the MLP down projection)."
        ),
    )
    num_virtual_tokens: int = Field(20, gt=0, description="`prefix`: learned key/value positions put before every input.")
    top_layers: int | None = Field(
        None,
        gt=0,
        description=(
            "Adapt only the top N decoder layers (peft's `layers_to_transform`; null = all). The backward pass then stops at the "
            "lowest adapted layer, so steps are cheaper, but the adapter learns less per step: on the demo (SmolLM2-135M, 30 "
            "layers), the top 10 trained 1.5x faster and scored 56.5% instead of 66.0% after the same 150 steps. LoRA and DoRA only."
        ),
    )


LoraConfig = AdapterConfig  # the section's old name


class QuantConfig(_Strict):
    bits: Literal[4, 16, 32] = Field(
        4, description="Base weights while training: 4 = QLoRA (bitsandbytes), 16/32 = plain LoRA or full fine-tuning on a float base."
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Compute dtype; `auto` picks bf16 where the hardware computes it natively (AVX512-BF16/AMX/Arm BF16 CPUs, "
        "GPUs from Ampere on), else fp16 on CUDA, else fp32 (emulated bf16 is slower than fp32).",
    )


class UnfreezeConfig(_Strict):
    every: int = Field(gt=0, description="Steps between unfreezing the next layer down (the top layer trains from step 1).")


class TrainConfig(_Strict):
    method: Literal["qlora", "lora", "full"] = Field(
        "qlora", description="`qlora` (4-bit base + LoRA), `lora` (float base + LoRA), or `full` fine-tuning (tiny models only)."
    )
    max_steps: int | None = Field(300, gt=0, description="Optimizer steps to train; null = use `epochs`.")
    epochs: float = Field(1.0, gt=0, description="Epochs to train when `max_steps` is null.")
    batch_size: int = Field(
        16,
        gt=0,
        description="Examples per micro-batch (per process); with packing they are laid end to end in rows of at most max_length tokens.",
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(5.0e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this before each step (as transformers' Trainer does); null = no clipping."
    )
    max_length: int = Field(256, gt=8, description="Maximum tokens per example; longer rows are truncated with a counted warning.")
    packing: bool = Field(True, description="Pack examples into rows without padding (padding-free; no attention across examples).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    eval_every: int = Field(50, gt=0, description="Evaluate validation loss every N steps.")
    save_every: int = Field(50, gt=0, description="Write a resumable checkpoint every N steps.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement; null = never stop early."
    )
    seed: int = Field(0, description="Seed of initialization, dropout and data order.")
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description=(
            "`sft`: learn the answers (cross-entropy on the answer tokens); `dpo`: direct preference optimization on "
            "`preference` data, against the model with the adapter disabled as the reference (no second copy in memory)."
        ),
    )
    beta: float = Field(0.1, gt=0, description="`dpo`: strength of the pull towards the reference (higher = stay closer).")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description=(
            "`dpo`: weight of an SFT term added to the DPO loss, the chosen answers' mean token cross-entropy (RPO, Pang et "
            "al. 2024; TRL's `loss_type: [sigmoid, sft]`): keeps the chosen answers likely while DPO pushes the rejected "
            "ones down. 0 = plain DPO."
        ),
    )
    init_from: str | None = Field(
        None,
        description=(
            "Start from an earlier result: a run folder (its merged model; merged first if needed), or a merged HF model "
            "folder. The new adapter trains on top of it, and for `dpo` it is the reference. A run needs `method: lora` "
            "(4 bits would round away what that run learned). Relative paths start at the recipe's folder."
        ),
    )
    unfreeze: UnfreezeConfig | None = Field(
        None, description="Gradual unfreezing: train only the top layer first, then one more layer down every `every` steps."
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="Layer-wise learning rates: layer i from the top trains at lr x decay^i (embeddings last); 1 = one rate.",
    )

    @property
    def dpo_settings(self) -> str:
        """The DPO loss's settings in words (logs, validate, model card)."""
        return f"beta {self.beta:g}" + (f", SFT term x {self.sft_weight:g}" if self.sft_weight else "")


class ExportConfig(_Strict):
    target: str = Field(
        "laptop-cpu", description="Target profile: a name in export/ (e.g. `laptop-cpu`, `raspberry-pi-5`) or a path to a YAML profile."
    )
    merge_into: Literal["dequantized", "float"] = Field(
        "dequantized",
        description=(
            "Merge the adapter into the dequantized NF4 base (what QLoRA trained against; default) or into the original float base."
        ),
    )


class EvalConfig(_Strict):
    task: Literal["label_match", "perplexity"] = Field(
        "label_match",
        description="`label_match`: the generated answer must equal the label after trimming; `perplexity`: held-out perplexity only.",
    )
    max_examples: int = Field(500, gt=0, description="Test rows to score per artifact (the first of the fixed test split).")
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description=(
            "Cap on the generation budget per answer for `label_match`; null = no cap. The budget is the longest answer in "
            "tokens (end-of-turn included) + 8, so every label can be answered."
        ),
    )
    artifacts: list[str] | None = Field(
        None,
        description=(
            "Artifacts to bench besides the PyTorch reference, by manifest name or glob (`merged`, `gguf-q4_k_m`, "
            "`onnx-*`); null: all of them."
        ),
    )
    generate: int = Field(
        8,
        ge=0,
        description=(
            "Chat data (`messages`, `alpaca`, `completion`): test prompts each artifact answers greedily, shown side by side "
            "with the reference answer and scored with chrF; 0 = none."
        ),
    )
    drift: bool = Field(
        True,
        description=(
            "Measure drift from base: each artifact against the untuned base model on general prompts that are not the "
            "task (KL, top-1 agreement, general-text perplexity), a forgetting check."
        ),
    )
    general_prompts: Path | None = Field(
        None,
        description=(
            "Your own general prompts for the drift check, added to ftedge's set: JSON lines of "
            '`{"prompt": ...}`, `{"messages": [...]}` or `{"text": ...}`; relative to the recipe\'s folder.'
        ),
    )


# Recipe keys naming an input an earlier command can make (``Recipe.made_by``).
MADE_BY_KEYS = ("data.train", "data.val", "data.test", "train.init_from", "eval.general_prompts")


class Recipe(_Strict):
    name: str = Field(description="Run name prefix: runs go to runs/<name>-<UTC timestamp>/.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base_model: str = Field(
        "smollm2-135m-instruct",
        description=(
            "Base model: an alias (`smollm2-135m-instruct`, embedded), a local HF folder, a .gguf file, or a hub id (needs network)."
        ),
    )
    trust_remote_code: bool = Field(False, description="Allow the base model's own Python code to run. Off unless you trust it.")
    chat_template: str | None = Field(
        None,
        description=(
            "Chat template to train and ship with, for a base model without one (a base-model .gguf, a pretrained-only HF "
            "folder) or to replace its own: a built-in (`chatml`, `gemma`, `llama3`, `phi3`; its turn tokens must be in the "
            "base's vocabulary) or a path to a .jinja file. Null: the base's own template."
        ),
    )
    data: DataConfig = Field(description="Training data: file, format, field mapping, system prompt, validation split.")
    adapter: AdapterConfig = Field(
        default_factory=AdapterConfig, description="The adapter: method (LoRA, DoRA, IA3, prefix tuning) and shape. Old name: `lora`."
    )
    quant: QuantConfig = Field(
        default_factory=QuantConfig, description="How the base weights are held while training (QLoRA 4-bit or float)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization, schedule, batching, checkpoints, evaluation.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Where to ship: target profile and merge mode.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="How bench scores each artifact.")
    made_by: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Inputs an earlier command makes, as recipe key -> that command (e.g. `data.train: ftedge data preferences runs/sft -o "
            f"runs/prefs`); keys: {', '.join(MADE_BY_KEYS)}. `ftedge validate` accepts them not made yet and names the command; "
            "training refuses until they exist."
        ),
    )

    @field_validator("name")
    @classmethod
    def _name_not_too_long(cls, v: str) -> str:
        if len(v) > 80:
            raise ValueError("at most 80 characters")
        return v

    @property
    def lora(self) -> AdapterConfig:
        """The adapter section under its old name."""
        return self.adapter

    @model_validator(mode="before")
    @classmethod
    def _old_lora_section(cls, raw: Any) -> Any:
        """`lora:` is the old name of `adapter:`; both in one recipe (e.g. `-o lora.r=8` on a new recipe) merge."""
        if isinstance(raw, dict) and "lora" in raw:
            raw = dict(raw)
            old = raw.pop("lora")
            new = raw.get("adapter")
            if isinstance(old, dict) and isinstance(new, dict):
                raw["adapter"] = {**new, **old}
            elif new is None:
                raw["adapter"] = old
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        train, method = self.train, self.adapter.method
        if train.method == "qlora" and self.quant.bits != 4:
            raise ValueError("train.method=qlora needs quant.bits=4 (or use train.method=lora)")
        if self.data.format == "text_label" and self.data.label_field == self.data.text_field:
            raise ValueError("data.label_field and data.text_field must differ")
        if (train.objective == "dpo") != (self.data.format == "preference"):
            raise ValueError("train.objective=dpo and data.format=preference go together (DPO learns from chosen/rejected pairs)")
        if train.objective == "dpo" and (train.method == "full" or method == "prefix"):
            raise ValueError(
                "train.objective=dpo needs a LoRA, DoRA or IA3 adapter (train.method qlora or lora): "
                "its reference is the model with the adapter disabled"
            )
        if train.sft_weight and train.objective != "dpo":
            raise ValueError("train.sft_weight adds an SFT term to the DPO loss: it needs train.objective=dpo (or drop it)")
        if train.method != "full" and method == "prefix":
            if train.packing:
                raise ValueError(
                    "adapter.method=prefix needs train.packing=false (the prefix is a key/value cache that packed rows cannot share)"
                )
            if train.unfreeze is not None or train.layer_lr_decay != 1.0:
                raise ValueError("train.unfreeze and train.layer_lr_decay act on layers; adapter.method=prefix has no per-layer weights")
        if self.adapter.top_layers is not None and (train.method == "full" or method not in ("lora", "dora")):
            raise ValueError("adapter.top_layers works with LoRA and DoRA adapters (peft's layers_to_transform); drop it for this method")
        unknown = sorted(set(self.made_by) - set(MADE_BY_KEYS))
        if unknown:
            raise ValueError(f"made_by: {', '.join(unknown)} is not an input a command makes (one of {', '.join(MADE_BY_KEYS)})")
        return self


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise FtedgeError(f"override {item!r} is not KEY=VALUE", hint="write e.g. -o train.max_steps=20")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise FtedgeError(f"override {item!r} has an empty key", hint="write e.g. -o train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``KEY=VALUE`` pairs in a raw recipe dict (values parsed as YAML scalars)."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise FtedgeError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = f"{source}: unknown key {loc!r}"
        hint = "remove it or check its spelling; `ftedge validate --explain` lists every key"
    elif kind == "missing":
        msg = f"{source}: missing required key {loc!r}"
        hint = "add it; `ftedge validate --explain` describes it"
    else:
        value = first.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        msg = f"{source}: {loc}: {first['msg']}{shown}"
        hint = "`ftedge validate --explain` lists allowed values"
    more = len(err.errors()) - 1
    if more:
        msg += f" [+{more} more problem{'s' if more > 1 else ''}]"
    return FtedgeError(msg, hint=hint).one_line()


def parse_recipe(raw: dict[str, Any], *, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a raw dict into a Recipe; relative data paths resolve against ``base_dir``."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise FtedgeError(_format_validation_error(source, err)) from None
    if base_dir is not None:
        data = recipe.data
        if not data.train.is_absolute():
            data.train = (base_dir / data.train).resolve()
        if data.val is not None and not data.val.is_absolute():
            data.val = (base_dir / data.val).resolve()
        if data.test is not None and not data.test.is_absolute():
            data.test = (base_dir / data.test).resolve()
        template = recipe.chat_template
        if template is not None and template.endswith(".jinja") and not Path(template).expanduser().is_absolute():
            recipe.chat_template = str((base_dir / template).resolve())
        init = recipe.train.init_from
        if init is not None and not Path(init).expanduser().is_absolute():
            recipe.train.init_from = str((base_dir / Path(init).expanduser()).resolve())
        general = recipe.eval.general_prompts
        if general is not None and not general.is_absolute():
            recipe.eval.general_prompts = (base_dir / general).resolve()
    return recipe


def require_mergeable(recipe: Recipe, stage: str) -> None:
    """Refuse merge/export/ship in one line when the recipe's adapter cannot be merged into the weights."""
    reason = unmergeable_reason(recipe)
    if reason is not None:
        raise FtedgeError(f"{stage}: {reason}", hint="bench it with `ftedge bench RUN`; use lora, dora or ia3 to export")


def unmergeable_reason(recipe: Recipe) -> str | None:
    """Why this recipe's result cannot be merged into the weights (and so not exported or shipped); None when it can."""
    if recipe.train.method != "full" and recipe.adapter.method not in MERGEABLE_METHODS:
        return (
            f"adapter.method={recipe.adapter.method} (prefix tuning) adds learned key/value positions, not weight deltas: it "
            "cannot be merged into the weights, so it is benched in PyTorch only (no GGUF/ONNX export, no ship/)"
        )
    return None


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    """Load, override and validate a recipe YAML; check its data files exist."""
    path = Path(path)
    if not path.is_file():
        raise FtedgeError(f"recipe {path} not found", hint="give the path of a recipe YAML, e.g. recipes/smollm2-banking77.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise FtedgeError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})", hint="fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise FtedgeError(f"{path}: a recipe must be a YAML mapping (got {type(raw).__name__})")
    raw = apply_overrides(raw, list(overrides or []))
    recipe = parse_recipe(raw, source=str(path), base_dir=path.resolve().parent)
    if check_files:
        check_data_files(recipe, source=str(path))
    return recipe


def check_data_files(recipe: Recipe, *, source: str, pending_ok: bool = False) -> list[str]:
    """Refuse a data file that is not there; one the recipe's ``made_by`` names a command for is refused with that command,
    or with ``pending_ok`` returned as a line saying which command makes it."""
    pending: list[str] = []
    for key, value in (
        ("data.train", recipe.data.train),
        ("data.val", recipe.data.val),
        ("data.test", recipe.data.test),
        ("eval.general_prompts", recipe.eval.general_prompts),
    ):
        if value is not None and not Path(value).exists():
            pending.append(not_made_yet(recipe, key, value, source=source, pending_ok=pending_ok))
    return pending


def not_made_yet(recipe: Recipe, key: str, value: str | Path, *, source: str, pending_ok: bool = False) -> str:
    """``key``'s input ``value`` is missing: a line naming the command that makes it (``pending_ok``), else a one-line error."""
    command = recipe.made_by.get(key)
    if command is None:
        raise FtedgeError(f"{source}: {key}: file {value} not found", hint=f"fix the path or pass -o {key}=PATH")
    if not pending_ok:
        raise FtedgeError(f"{source}: {key}: {value} is not made yet", hint=f"run `{command}` first (the recipe's made_by)")
    return f"{key}: {value} not made yet: `{command}` makes it"


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (paths absolute), for freezing into a run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def type_name_of(ann: Any) -> str:
    """A readable name of a field's type: ``int``, ``str or None``, ``one of (a, b)``, ``list[...]``."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_name_of(args[0])
    if origin is Literal:
        return "one of (" + ", ".join(str(a) for a in args) + ")"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name_of(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name_of(a) for a in args)}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def explain(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every recipe field, nested sections included."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else _optional_section(ann)
        if section is not None:
            rows.append((key, "section", "", field.description or ""))
            rows.extend(explain(section, prefix=f"{key}."))
            continue
        type_name = type_name_of(ann)
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = ""
        else:
            default = repr(field.default) if not isinstance(field.default, str) else field.default
        rows.append((key, type_name, str(default), field.description or ""))
    return rows


def _optional_section(ann: Any) -> type[BaseModel] | None:
    """``Section | None`` -> Section (an optional nested section, e.g. ``train.unfreeze``); None for anything else."""
    import types
    import typing

    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None
