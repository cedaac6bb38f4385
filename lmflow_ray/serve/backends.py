"""Async generation backends for serving, on top of the engine interface (`inference/`).

`HFBackend` runs transformers `generate` on one worker thread (the model serves one batch
at a time; concurrent requests are merged into batches by `@serve.batch` in the deployment).
LoRA adapters are loaded side by side into one peft model and switched per batch; base
requests run with the adapters disabled.

`VLLMBackend` gives vLLM continuous batching through its `AsyncLLM`: the engine core runs in a
process of its own (as in vLLM's own server), requests join and leave the running batch at
every step, outputs come back as deltas, and a client that goes away has its request aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from lmflow_ray.config import rope_factor
from lmflow_ray.inference.engine import Completion, Engine, SamplingParams
from lmflow_ray.models.zoo import is_adapter
from lmflow_ray.serve.config import ModelSpec


class StreamEnd(NamedTuple):
    """The last item of a stream: why it ended ("stop" or "length") and how many tokens it generated."""

    reason: str
    tokens: int


class Backend:
    engine: Engine
    context_len: int

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompts: list[str], params: SamplingParams, adapter: str | None,
                       add_special_tokens: bool, images: list[list] | None = None) -> list[list[Completion]]:
        """`images`: per prompt, its images (only for an engine that `accepts_images`; the replica checks)."""
        raise NotImplementedError

    def stream(self, prompt: str, params: SamplingParams, adapter: str | None,
               add_special_tokens: bool, images: list | None = None) -> AsyncIterator[str | StreamEnd]:
        """Text pieces as tokens arrive, then a StreamEnd."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Free what lives outside this process (vLLM's engine-core process)."""


class HFBackend(Backend):
    def __init__(self, spec: ModelSpec):
        from lmflow_ray.inference.hf import HFEngine
        from lmflow_ray.models.zoo import resolve_model

        self.engine = HFEngine.load(spec.path, template=spec.template, draft_model=spec.draft_model,
                                    rope_scaling=spec.rope_scaling, max_batch_size=spec.max_batch_size)
        model = self.engine.model
        # A model given as an adapter dir is base + that adapter (peft names it "default").
        self.own_adapter = "default" if is_adapter(resolve_model(spec.path)) else None
        if spec.adapters:
            from peft import PeftModel

            for name, path in spec.adapters.items():
                path = str(resolve_model(path))
                if isinstance(model, PeftModel):
                    model.load_adapter(path, adapter_name=name)
                else:
                    model = PeftModel.from_pretrained(model, path, adapter_name=name)
            self.engine.model = model.eval()
        trained = model.config.get_text_config().max_position_embeddings
        self.context_len = min(spec.max_model_len or 10**9, int(trained * rope_factor(spec.rope_scaling)))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None):
        from peft import PeftModel

        model = self.engine.model
        if not isinstance(model, PeftModel):
            yield
        elif adapter is None and self.own_adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter or self.own_adapter)
            yield

    def _generate(self, prompts, params, adapter, add_special_tokens, images=None):
        with self._adapter(adapter):
            return self.engine.generate(prompts, params, add_special_tokens=add_special_tokens, images=images)

    async def generate(self, prompts, params, adapter, add_special_tokens, images=None):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._generate, prompts, params, adapter, add_special_tokens,
                                          images)

    async def stream(self, prompt, params, adapter, add_special_tokens, images=None):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work():
            try:
                with self._adapter(adapter):
                    gen = self.engine.stream(prompt, params, add_special_tokens=add_special_tokens, images=images)
                    for piece in gen:
                        loop.call_soon_threadsafe(pieces.put_nowait, piece)
                        if stop.is_set():
                            gen.close()  # the client left: stop generating
                            break
                n, ended = self.engine.last_stream
                reason = "length" if n >= params.max_tokens and not ended and not stop.is_set() else "stop"
                loop.call_soon_threadsafe(pieces.put_nowait, (done, StreamEnd(reason, n)))
            except BaseException as e:  # handed to the consumer
                loop.call_soon_threadsafe(pieces.put_nowait, (done, e))

        future = loop.run_in_executor(self.pool, work)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, tuple) and item[0] is done:
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    yield item[1]
                    return
                yield item
        finally:
            stop.set()
            await asyncio.shield(future)  # let the worker thread finish its generate (a done future returns at once)


class VLLMBackend(Backend):
    def __init__(self, spec: ModelSpec):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gb)
        from vllm.lora.request import LoRARequest

        from lmflow_ray.inference.vllm_engine import VLLMEngine
        from lmflow_ray.models.zoo import adapter_config, resolve_model

        extra = {}
        if spec.adapters:
            ranks = [int(adapter_config(resolve_model(p)).get("r", 8)) for p in spec.adapters.values()]
            extra = {"enable_lora": True, "max_loras": len(spec.adapters) + 1, "max_lora_rank": max(ranks + [8])}
        self.engine = VLLMEngine.load_async(spec.path, template=spec.template, max_model_len=spec.max_model_len or 2048,
                                            **extra)
        self.loras = {name: LoRARequest(name, i + 2, str(resolve_model(path)))
                      for i, (name, path) in enumerate(spec.adapters.items())}
        self.context_len = int(self.engine.llm.model_config.max_model_len)

    async def _run(self, prompt: str, params: SamplingParams, adapter, add_special_tokens,
                   final_only: bool = False) -> AsyncIterator:
        """vLLM's outputs of one request: the whole answers once (`final_only`), or what is new at each step.
        A consumer that stops early (a client that went away) aborts the request (AsyncLLM does on close)."""
        from vllm.sampling_params import RequestOutputKind

        vparams = self.engine.sampling_params(params)
        # Whole answers only: vLLM then gathers the n samples of a request into one output.
        vparams.output_kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
        lora = self.loras[adapter] if adapter else self.engine.lora_request
        async for out in self.engine.llm.generate(self.engine.prompt_input(prompt, add_special_tokens), vparams,
                                                  uuid.uuid4().hex, lora_request=lora):
            yield out

    async def _one(self, prompt, params, adapter, add_special_tokens) -> list[Completion]:
        from lmflow_ray.inference.vllm_engine import completion_of

        last = None
        async for out in self._run(prompt, params, adapter, add_special_tokens, final_only=True):
            last = out
        return [completion_of(o.text, list(o.token_ids), o.finish_reason, o.logprobs, params) for o in last.outputs]

    async def generate(self, prompts, params, adapter, add_special_tokens, images=None):
        return list(await asyncio.gather(*(self._one(p, params, adapter, add_special_tokens) for p in prompts)))

    async def stream(self, prompt, params, adapter, add_special_tokens, images=None):
        reason, tokens = None, 0
        async for out in self._run(prompt, params, adapter, add_special_tokens):
            o = out.outputs[0]
            tokens += len(o.token_ids)
            reason = o.finish_reason or reason
            if o.text:
                yield o.text
        yield StreamEnd("length" if reason == "length" else "stop", tokens)

    def shutdown(self) -> None:
        self.engine.llm.shutdown()
        self.engine.reaper.stdin.close()  # nothing left to reap: the reaper exits


def make_backend(spec: ModelSpec) -> Backend:
    if spec.torch_threads:
        import torch

        torch.set_num_threads(spec.torch_threads)
    return HFBackend(spec) if spec.engine == "hf" else VLLMBackend(spec)
