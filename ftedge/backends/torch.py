"""PyTorch backend (transformers): an HF folder, optionally with a PEFT adapter on top."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftedge.backends.base import BATCH_TOKENS, Backend, Sampling, batch_tokens, length_batches, sample_next


def batched_logits(model: Any, rows: Sequence[Sequence[int]], *, start: int = 0, max_tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """float32 logits of each row of token ids from position ``start`` on, in the rows' order: ``model`` (a
    transformers causal LM, a peft model too) run on right-padded batches with an attention mask, rows sorted by
    length, each batch at most ``max_tokens`` padded tokens (fewer for a large vocabulary: ``batch_tokens``).
    Causal attention never lets a real position see the padding after it, so each row's logits are its own
    single-row pass's within float rounding."""
    import torch

    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size", 0)
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(rows)
    with torch.inference_mode():
        for batch in length_batches([len(r) for r in rows], batch_tokens(vocab, max_tokens)):
            width = max(len(rows[i]) for i in batch)
            if width == 0:  # only empty rows: nothing to run
                continue
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, : len(rows[i])] = torch.tensor(list(rows[i]), dtype=torch.long)
                mask[b, : len(rows[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for b, i in enumerate(batch):
                out[i] = logits[b, start : len(rows[i])].float().cpu().numpy()
            del logits
    return out


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        path: str | Path,
        *,
        adapter: str | Path | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        four_bit: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        merge_adapter: bool | None = None,
    ) -> None:
        """An HF folder in ``dtype``, or 4-bit as training held it (``four_bit``: a recipe's ``quant`` section);
        ``chat_template`` (text) replaces the folder's own (a base + adapter is rendered with the trained template).

        ``merge_adapter`` (None = where exact): an adapter on float32 weights is merged into them in memory
        (W + s·BA once, instead of two extra matmuls per layer and per token): the same function up to float32
        rounding (the demo's reference: logits within 7e-5, the same argmax) and 1.2-1.3x faster on a 2-core
        CPU. Never into 4-bit weights (the rounding would erase the adapter) nor 16-bit ones (bf16 keeps 8 bits
        of a weight: too few for a small LoRA change), nor for prefix tuning (nothing to merge), nor when the adapter
        sits on a tied LM head or embedding (merging would change both): those keep the adapter as trained."""
        import torch

        from ftedge.loader import compute_dtype, dequantize_4bit, load_causal_lm, load_tokenizer
        from ftedge.recipe import QuantConfig

        self.path = Path(path)
        self.adapter_merged = False
        if threads:
            torch.set_num_threads(threads)
        if four_bit is not None:
            quant = QuantConfig(**four_bit)
            dt = compute_dtype(quant.compute_dtype)
            model = load_causal_lm(self.path, dtype=dt, four_bit=quant, trust_remote_code=trust_remote_code)
            if model.device.type == "cpu":  # the NF4-rounded weights, dequantized once (as CPU training holds them)
                model = dequantize_4bit(model, dt)
        else:
            model = load_causal_lm(self.path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(
            self.path, trust_remote_code=trust_remote_code, require_chat_template=False, chat_template=chat_template
        )
        if adapter is not None:
            from ftedge.families import adapts_tied_embedding, prefix_tokens
            from ftedge.loader import attach_adapter

            model = attach_adapter(model, adapter)
            exact = (
                prefix_tokens(model) == 0 and all(p.dtype == torch.float32 for p in model.parameters()) and not adapts_tied_embedding(model)
            )
            self.adapter_merged = exact if merge_adapter is None else merge_adapter
            if self.adapter_merged:
                model = model.merge_and_unload()
            else:
                from peft.helpers import DoraCaching

                # The adapter never changes here: DoRA's weight norms and B @ A are computed once, not on every
                # forward (peft caches them in eval mode only, and clears them when a model trains again).
                DoraCaching()(enabled=True)
        self.model = model.eval()
        # Decoding steps after the first run the wrapped model itself: the cache already holds what
        # the adapter adds (a prefix-tuning adapter's key/value prefix, which peft's forward would
        # otherwise put in front of the cache again); for LoRA-style adapters it is the same model.
        get_base = getattr(model, "get_base_model", None)
        self._step_model = get_base() if callable(get_base) else model
        self.device = next(model.parameters()).device
        self._torch = torch

    @property
    def stop_ids(self) -> set[int]:
        """EOS (the generation config's and the tokenizer's) and the token the chat template ends a turn with."""
        from ftedge.families import end_of_turn_id

        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        eot = end_of_turn_id(self.tokenizer)
        if eot is not None:
            ids.add(eot)
        return ids

    @property
    def settings(self) -> dict[str, Any]:
        out = {"runtime": "torch", "threads": self._torch.get_num_threads(), "dtype": str(self.model.dtype).removeprefix("torch.")}
        return out | ({"adapter": "merged in memory"} if self.adapter_merged else {})

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        from ftedge.formats.chat_template import fit_messages

        chat = fit_messages(messages, self.tokenizer.chat_template)
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            out = self.model(input_ids=x).logits[0]
        return out.float().cpu().numpy()

    def logits_batch(self, rows: Sequence[Sequence[int]], *, start: int = 0) -> list[np.ndarray]:
        return batched_logits(self.model, rows, start=start)

    def generate(
        self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None
    ) -> Iterator[int]:
        torch = self._torch
        stops = self.stop_ids if stop_ids is None else stop_ids
        rng = sampling.rng() if sampling is not None and not sampling.greedy else None
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            out = self.model(input_ids=x, use_cache=True)
            past = out.past_key_values
            for _ in range(max_new_tokens):
                if rng is None:
                    tok = int(out.logits[0, -1].argmax())
                else:
                    tok = sample_next(out.logits[0, -1].float().cpu().numpy(), sampling, rng)
                yield tok
                if tok in stops:
                    return
                out = self._step_model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=past, use_cache=True)
                past = out.past_key_values
