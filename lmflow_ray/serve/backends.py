"""Async generation backends for serving, on top of the engine interface (`inference/`).

`HFBackend` runs transformers `generate` on one worker thread (the model serves one batch
at a time; concurrent requests are merged into batches by `@serve.batch` in the deployment).
LoRA adapters are loaded side by side into one peft model and switched per batch; base
requests run with the adapters disabled.

`VLLMBackend` gives vLLM continuous batching: one thread owns the engine and loops
`step()`, adding requests submitted from the event loop between steps and handing each
request's outputs back to its asyncio queue. Requests join and leave the running batch at
every step, and a client that goes away has its request aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from lmflow_ray.config import rope_factor
from lmflow_ray.inference.engine import Completion, Engine, SamplingParams, TextDeltas
from lmflow_ray.models.zoo import is_adapter
from lmflow_ray.serve.config import ModelSpec


class Backend:
    engine: Engine
    context_len: int

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompts: list[str], params: SamplingParams, adapter: str | None,
                       add_special_tokens: bool) -> list[list[Completion]]:
        raise NotImplementedError

    def stream(self, prompt: str, params: SamplingParams, adapter: str | None,
               add_special_tokens: bool) -> AsyncIterator[tuple[str, str | None]]:
        """(text piece, None) as tokens arrive, then ("", finish_reason)."""
        raise NotImplementedError


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

    def _generate(self, prompts, params, adapter, add_special_tokens):
        with self._adapter(adapter):
            return self.engine.generate(prompts, params, add_special_tokens=add_special_tokens)

    async def generate(self, prompts, params, adapter, add_special_tokens):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._generate, prompts, params, adapter, add_special_tokens)

    async def stream(self, prompt, params, adapter, add_special_tokens):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work():
            text = []
            try:
                with self._adapter(adapter):
                    gen = self.engine.stream(prompt, params, add_special_tokens=add_special_tokens)
                    for piece in gen:
                        text.append(piece)
                        loop.call_soon_threadsafe(pieces.put_nowait, piece)
                        if stop.is_set():
                            gen.close()  # the client left: stop generating
                            break
                n = len(self.tokenizer("".join(text), add_special_tokens=False)["input_ids"])
                reason = "length" if n >= params.max_tokens else "stop"
                loop.call_soon_threadsafe(pieces.put_nowait, (done, reason))
            except BaseException as e:  # handed to the consumer
                loop.call_soon_threadsafe(pieces.put_nowait, (done, e))

        future = loop.run_in_executor(self.pool, work)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, tuple) and item[0] is done:
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    yield "", item[1]
                    return
                yield item, None
        finally:
            stop.set()
            await asyncio.shield(future)  # let the worker thread finish its generate (a done future returns at once)


class VLLMBackend(Backend):
    def __init__(self, spec: ModelSpec):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gb)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm.lora.request import LoRARequest

        from lmflow_ray.inference.vllm_engine import VLLMEngine
        from lmflow_ray.models.zoo import adapter_config, resolve_model

        extra = {}
        if spec.adapters:
            ranks = [int(adapter_config(resolve_model(p)).get("r", 8)) for p in spec.adapters.values()]
            extra = {"enable_lora": True, "max_loras": len(spec.adapters) + 1, "max_lora_rank": max(ranks + [8])}
        self.engine = VLLMEngine.load(spec.path, template=spec.template, max_model_len=spec.max_model_len or 2048, **extra)
        self.loras = {name: LoRARequest(name, i + 2, str(resolve_model(path)))
                      for i, (name, path) in enumerate(spec.adapters.items())}
        self.context_len = int(self.engine.llm.llm_engine.model_config.max_model_len)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vllm-step-loop", daemon=True)
        self._thread.start()

    # The engine thread: the only code that touches the vLLM engine after start-up.
    def _loop(self):
        engine = self.engine.llm.llm_engine
        sinks: dict[str, tuple] = {}
        while True:
            while True:
                try:
                    op = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if op[0] == "add":
                    _, rid, prompt, vparams, lora, sink = op
                    try:
                        engine.add_request(rid, prompt, vparams, lora_request=lora)
                        sinks[rid] = sink
                    except Exception as e:  # bad request: tell the caller, keep serving
                        sink[0].call_soon_threadsafe(sink[1].put_nowait, e)
                elif op[1] in sinks:
                    engine.abort_request([op[1]])
                    sinks.pop(op[1], None)
            if not sinks:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # an engine failure fails the requests in flight, not the loop
                for loop, q in sinks.values():
                    loop.call_soon_threadsafe(q.put_nowait, e)
                sinks.clear()
                continue
            for out in outputs:
                sink = sinks.get(out.request_id)
                if sink is None:
                    continue
                snapshot = ([(o.text, list(o.token_ids), o.finish_reason, o.logprobs) for o in out.outputs], out.finished)
                sink[0].call_soon_threadsafe(sink[1].put_nowait, snapshot)
                if out.finished:
                    sinks.pop(out.request_id)

    async def _run(self, prompt: str, params: SamplingParams, adapter, add_special_tokens,
                   final_only: bool = False) -> AsyncIterator[tuple]:
        from vllm.sampling_params import RequestOutputKind

        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        lora = self.loras[adapter] if adapter else self.engine.lora_request
        vparams = self.engine.sampling_params(params)
        # Whole answers only: vLLM then gathers the n samples of a request into one output.
        vparams.output_kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE
        self._inbox.put(("add", rid, self.engine.prompt_input(prompt, add_special_tokens), vparams,
                         lora, (asyncio.get_running_loop(), q)))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                outs, finished = item
                yield outs
        finally:
            if not finished:
                self._inbox.put(("abort", rid))
                self._wake.set()

    async def _one(self, prompt, params, adapter, add_special_tokens) -> list[Completion]:
        last = None
        async for outs in self._run(prompt, params, adapter, add_special_tokens, final_only=True):
            last = outs
        return [self._completion(o, params) for o in last]

    @staticmethod
    def _completion(o, params: SamplingParams) -> Completion:
        from lmflow_ray.inference.vllm_engine import completion_of

        text, token_ids, reason, logprobs = o
        return completion_of(text, token_ids, reason, logprobs, params)

    async def generate(self, prompts, params, adapter, add_special_tokens):
        return list(await asyncio.gather(*(self._one(p, params, adapter, add_special_tokens) for p in prompts)))

    async def stream(self, prompt, params, adapter, add_special_tokens):
        new_text, reason = TextDeltas(), None
        async for outs in self._run(prompt, params, adapter, add_special_tokens):
            text, _, reason, _ = outs[0]
            piece = new_text(text)
            if piece:
                yield piece, None
        yield "", "length" if reason == "length" else "stop"


def make_backend(spec: ModelSpec) -> Backend:
    if spec.torch_threads:
        import torch

        torch.set_num_threads(spec.torch_threads)
    return HFBackend(spec) if spec.engine == "hf" else VLLMBackend(spec)
