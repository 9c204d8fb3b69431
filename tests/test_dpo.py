"""Preference tuning: the preference data format, the DPO loss against TRL's DPOTrainer, and a DPO
run that starts from an SFT run (reference = that model with the adapter disabled)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LABELS, SYSTEM, write_text_label_csv

from ftedge.errors import FtedgeError
from ftedge.recipe import DataConfig

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

PAIRS = [
    ("where is my new card", "card_arrival", "exchange_rate"),
    ("i lost my card", "lost_or_stolen_card", "card_arrival"),
    ("what is the exchange rate", "exchange_rate", "top_up_failed"),
    ("my top up failed", "top_up_failed", "lost_or_stolen_card"),
]


def _cfg(**kw) -> DataConfig:
    return DataConfig(train=Path("x.jsonl"), format="preference", system_prompt=SYSTEM, **kw)


def test_preference_formats_read_alike() -> None:
    from ftedge.data.reading import row_to_example

    user = [{"role": "user", "content": "i lost my card"}]
    rows = [
        {"prompt": "i lost my card", "chosen": "lost_or_stolen_card", "rejected": "card_arrival"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "lost_or_stolen_card"}], "rejected": "card_arrival"},
        {  # implicit prompt: two whole conversations (TRL's format), as JSON strings the way a CSV holds them
            "chosen": json.dumps([*user, {"role": "assistant", "content": "lost_or_stolen_card"}]),
            "rejected": json.dumps([*user, {"role": "assistant", "content": "card_arrival"}]),
        },
    ]
    examples = [row_to_example(row, f"f:row {i}", _cfg()) for i, row in enumerate(rows)]
    for ex in examples:
        assert ex.messages == [{"role": "system", "content": SYSTEM}, *user]
        assert (ex.target, ex.rejected) == ("lost_or_stolen_card", "card_arrival")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "hi", "chosen": "a"}, "no 'rejected'"),
        ({"prompt": "hi", "chosen": "a", "rejected": "  "}, "no 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "are not conversations"),
        (
            {
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}],
            },
            "differ before their last turn",
        ),
        ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
    ],
)
def test_bad_preference_rows_are_one_line(row, match) -> None:
    from ftedge.data.reading import row_to_example

    with pytest.raises(FtedgeError, match=match):
        row_to_example(row, "f:row 3", _cfg())


def _pairs_and_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    from ftedge.data.encoding import ChatEncoder
    from ftedge.data.reading import row_to_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = [row_to_example({"prompt": p, "chosen": c, "rejected": r}, f"row {i}", _cfg()) for i, (p, c, r) in enumerate(PAIRS)]
    return examples, ChatEncoder(tok, 64).encode_all(examples, pairs=True), tok


def _policy(model_dir: Path):
    """A LoRA policy whose adapter is not zero (so policy and reference differ and the loss is not log 2)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3 / max(float(p.abs().mean()), 1e-8))
    return peft_model, config


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_loss_and_gradients_match_trl(tiny_model_dir: Path, tmp_path: Path, sft_weight: float) -> None:
    """Same tiny data, same LoRA weights: ftedge's first-step DPO loss and LoRA gradients equal TRL's DPOTrainer's
    (its default sigmoid loss, reference = the adapter disabled), with ftedge's rows packed and TRL's padded; with
    ``sft_weight``, TRL's ``loss_type=["sigmoid", "sft"]`` weighted [1, sft_weight] (RPO)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ftedge.train.batch import make_batch
    from ftedge.train.dpo import PreferenceLoss

    beta = 0.1
    examples, pairs, tok = _pairs_and_tokenizer(tiny_model_dir)
    ours, lora_config = _policy(tiny_model_dir)
    rows = [r for p in pairs for r in (p.chosen, p.rejected)]
    batch = make_batch(rows, max_length=64, packing=True, pad_id=tok.pad_token_id, segments=True)
    batch.pop("n_tokens")
    loss_sum, chosen, rejected = PreferenceLoss(ours, beta, sft_weight)(**batch, n_rows=len(rows))
    loss = loss_sum / len(pairs)
    loss.backward()
    our_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    assert abs(float(loss) - 0.6931) > 1e-3  # policy != reference

    # TRL on the same text: the rendered prompt, the answer ending with the end-of-turn (= EOS) token.
    data = Dataset.from_list(
        [
            {"prompt": tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True), "chosen": c + "<|im_end|>"}
            | {"rejected": r + "<|im_end|>"}
            for ex, (_, c, r) in zip(examples, PAIRS, strict=True)
        ]
    )
    seen: dict[str, object] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen["loss"] = float((out[0] if isinstance(out, tuple) else out).detach())
            return out

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}),
        per_device_train_batch_size=len(PAIRS),
        max_steps=1,
        learning_rate=1e-6,
        max_grad_norm=0.0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=64,
        dataloader_num_workers=0,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = Trainer(model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora_config, callbacks=[Capture()])
    theirs = trainer.model
    with torch.no_grad():  # the same adapter weights as ours
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[name])
    processed = trainer.train_dataset
    for i, pair in enumerate(pairs):  # the same tokens: prompt (untrained) + answer with <|im_end|> (trained)
        assert processed[i]["prompt_ids"] + processed[i]["chosen_ids"] == pair.chosen.input_ids
        assert processed[i]["prompt_ids"] + processed[i]["rejected_ids"] == pair.rejected.input_ids
        assert len(processed[i]["chosen_ids"]) == sum(x != -100 for x in pair.chosen.labels)
    trainer.train()
    assert seen["loss"] == pytest.approx(float(loss), abs=1e-5)
    grads = seen["grads"]
    assert set(grads) == set(our_grads)
    for name, g in our_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def _sft_and_dpo_recipes(tmp_path: Path, tiny_recipe: Path) -> Path:
    write_text_label_csv(tmp_path / "train.csv")
    rows = []
    for i, (text, label, other) in enumerate(PAIRS * 6):
        rows.append({"prompt": f"{text}{' please' * (i % 3)}", "chosen": label, "rejected": other if i % 2 else LABELS[(i + 1) % 4]})
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["chosen"] != r["rejected"]))
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["name"] = "tiny-dpo"
    raw["data"] = {"train": "pref.jsonl", "format": "preference", "system_prompt": SYSTEM, "val_fraction": 0.25}
    raw["train"].update(objective="dpo", beta=0.1, init_from="sft", max_steps=4, eval_every=2, save_every=2)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dpo_run_starts_from_sft_run(tiny_recipe: Path, tmp_path: Path) -> None:
    """SFT run (not merged) -> a DPO recipe naming it: the SFT run is merged first and is the DPO base and
    reference; the first step's loss is log 2 (policy = reference), rewards are logged, the DPO adapter merges."""
    from ftedge import commands
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.train import train_stage

    sft = Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "sft")
    train_stage(sft)
    assert sft.artifact("merged") is None
    dpo = commands.train(_sft_and_dpo_recipes(tmp_path, tiny_recipe), [], run_dir=tmp_path / "dpo")
    assert sft.artifact("merged") is not None  # merged on the way
    records = [json.loads(x) for x in (dpo.path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # LoRA starts at zero: policy == reference
    assert records[0]["reward_margin"] == 0.0
    assert all({"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(r) for r in records)
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(records[1])
    assert any(r["loss"] != pytest.approx(0.693147, abs=1e-4) for r in records[1:])  # it moves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(dpo.path / "train"))
    events.Reload()
    assert {"train/reward_margin", "train/reward_accuracy", "eval/reward_accuracy"} <= set(events.Tags()["scalars"])
    adapter = dpo.artifact("adapter")
    assert adapter.entry["objective"] == "dpo" and Path(adapter.entry["base_model"]) == sft.artifact("merged").path
    assert dpo.base_model() == sft.artifact("merged").path
    commands.merge(dpo.path)
    drift = dpo.manifest()["stages"]["merge"]["metrics"]["drift"]["float"]
    assert drift["top1"] == 1.0 and drift["kl"] < 1e-5


@pytest.mark.parametrize(
    ("train", "data", "match"),
    [
        ({"objective": "dpo", "method": "full"}, {"format": "preference"}, "needs a LoRA, DoRA or IA3 adapter"),
        ({"objective": "dpo"}, {"format": "text_label"}, "go together"),
        ({}, {"format": "preference"}, "go together"),
        ({"sft_weight": 1.0}, {}, "needs train.objective=dpo"),
    ],
)
def test_dpo_recipe_mistakes_are_one_line(tiny_recipe: Path, train: dict, data: dict, match: str) -> None:
    from ftedge.recipe import load_recipe

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"].update(train)
    raw["data"].update(data)
    tiny_recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(FtedgeError, match=match):
        load_recipe(tiny_recipe)


def test_init_from_a_missing_run_is_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    from ftedge.validate import preflight

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"]["init_from"] = "no-such-run"
    tiny_recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(FtedgeError, match="train.init_from: .*no-such-run not found"):
        preflight(tiny_recipe)


def test_init_from_a_run_in_4_bits_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    """Quantizing an SFT run's merged model to NF4 again erases most of what it learned: init_from a run needs a float base."""
    from ftedge.manifest import Run
    from ftedge.recipe import load_recipe
    from ftedge.validate import preflight

    Run.create(load_recipe(tiny_recipe), run_dir=tmp_path / "sft")
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["train"].update(init_from=str(tmp_path / "sft"), method="qlora")
    raw["quant"] = {"bits": 4, "compute_dtype": "float32"}
    tiny_recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(FtedgeError, match="train.method=qlora would quantize its merged model to 4 bits") as err:
        preflight(tiny_recipe)
    assert "train.method=lora" in err.value.one_line()
    raw["train"]["method"], raw["quant"]["bits"] = "lora", 16
    tiny_recipe.write_text(yaml.safe_dump(raw))
    assert any(line.startswith("init_from: run") for line in preflight(tiny_recipe))


def test_packed_pairs_give_each_row_its_own_sum(tiny_model_dir: Path) -> None:
    """make_batch's segments: packed or padded, each row's summed answer log-probability is the same."""
    from ftedge.train.batch import make_batch
    from ftedge.train.dpo import PreferenceLoss

    _, pairs, tok = _pairs_and_tokenizer(tiny_model_dir)
    rows = [r for p in pairs for r in (p.chosen, p.rejected)]
    model, _ = _policy(tiny_model_dir)
    loss = PreferenceLoss(model, 0.1)
    out = []
    for packing in (True, False):
        batch = make_batch(rows, max_length=64, packing=packing, pad_id=tok.pad_token_id, segments=True)
        batch.pop("n_tokens")
        with torch.no_grad():
            out.append(loss.sequence_logps(batch, len(rows)))
    (packed, counts), (padded, padded_counts) = out
    assert packed.shape == (len(rows),) and bool((packed < 0).all())
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == padded_counts.tolist() == [float(sum(x != -100 for x in r.labels[1:])) for r in rows]


# -- `ftedge data preferences RUN`: a run's own mistakes as preference pairs -------------------------------------------
def _greedy_answers(model_dir: Path, examples) -> list[str]:
    """Plain transformers greedy decoding up to <|im_end|>: what the run's merged model answers, found without ftedge
    (budget: the longest gold answer, its end-of-turn and 8 tokens of slack, as ftedge's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    max_new_tokens = max(len(tok(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples) + 9
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    with torch.inference_mode():
        for ex in examples:
            ids = tok(tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True), return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def test_data_preferences_pairs_the_runs_mistakes_on_training_rows(tmp_path: Path, tokenizer_dir: Path) -> None:
    from click.testing import CliRunner
    from helpers import make_adapter, make_run
    from tiny_models import trained_tiny_model

    from ftedge import commands
    from ftedge.cli import main
    from ftedge.data.splits import load_splits, normalize, run_splits
    from ftedge.recipe import load_recipe

    base = trained_tiny_model(tmp_path / "base", tokenizer_dir, steps=40)  # some answers right, some wrong
    run = make_run(tmp_path, base, make_adapter(base, tmp_path / "adapter"))
    out = tmp_path / "prefs"
    stats = commands.data_preferences(run.path, out=out, rows=16)
    assert run.artifact("merged") is not None  # merged on the way: its merged model answers
    splits = run_splits(run)
    asked = splits.train[:16]
    said = _greedy_answers(run.artifact("merged").path, asked)
    want = [
        {"prompt": e.messages[-1]["content"], "chosen": e.target, "rejected": a} for e, a in zip(asked, said, strict=True) if a != e.target
    ]
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert pairs == want and 0 < len(pairs) < 16, said  # every mistake, nothing else, in row order
    assert stats["train_accuracy"] == pytest.approx((16 - len(pairs)) / 16, abs=1e-4) and stats["preference_pairs"] == len(pairs)
    for name, part in (("val.jsonl", splits.val), ("test.jsonl", splits.test)):  # held-out rows: gold vs another label, in order
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert [(r["prompt"], r["chosen"]) for r in rows] == [(e.messages[-1]["content"], e.target) for e in part] and rows
        assert all(r["rejected"] in LABELS and r["rejected"] != r["chosen"] for r in rows)
    held_out = {normalize(e.messages[-1]["content"]) for e in splits.val + splits.test}
    assert not {normalize(p["prompt"]) for p in pairs} & held_out  # never a validation or test row
    # a DPO recipe reads the set: its test rows are the run's test rows, with the same system prompt
    raw = yaml.safe_load((run.path / "recipe.yaml").read_text())
    raw["data"] = {
        "train": str(out / "train.jsonl"),
        "val": str(out / "val.jsonl"),
        "test": str(out / "test.jsonl"),
        "format": "preference",
    }
    raw["data"]["system_prompt"] = SYSTEM
    raw["train"].update(objective="dpo", method="lora")
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw))
    dpo = load_splits(load_recipe(tmp_path / "dpo.yaml"))
    assert [(e.messages, e.target) for e in dpo.test] == [(e.messages, e.target) for e in splits.test]
    assert sorted((e.target, e.rejected) for e in dpo.train + dpo.left_out) == sorted((p["chosen"], p["rejected"]) for p in pairs)
    # the command line: the set is replaced whole; a folder that is not a preference set is refused in one line
    res = CliRunner().invoke(main, ["data", "preferences", str(run.path), "-o", str(out), "--rows", "16"])
    assert res.exit_code == 0, res.output
    assert f"{out}: {len(pairs)} preference pairs from 16 training rows" in res.output
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["data", "preferences", str(run.path), "-o", str(tmp_path / "notes")])
    assert res.exit_code == 2 and "is not a preference set made by `ftedge data preferences`" in res.output
    assert len(res.output.strip().splitlines()) == 1 and (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
