"""PyTorch backend (transformers): an HF folder, optionally with a PEFT adapter on top."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ftedge.backends.base import Backend, Sampling, sample_next
from ftedge.errors import FtedgeError


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        path: str | Path,
        *,
        adapter: str | Path | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        load_in_4bit: bool = False,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str = "bfloat16",
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        if threads:
            torch.set_num_threads(threads)
        kwargs: dict = {"dtype": getattr(torch, dtype), "use_safetensors": True, "trust_remote_code": trust_remote_code}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            )
            kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
            kwargs.pop("dtype")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        except OSError as err:
            raise FtedgeError(f"cannot load model {self.path} ({err})") from None
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self._torch = torch

    @property
    def stop_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

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

    def generate(self, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int] | None = None, sampling: Sampling | None = None) -> Iterator[int]:
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
                out = self.model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=past, use_cache=True)
                past = out.past_key_values
