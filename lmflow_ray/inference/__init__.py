"""Generation engines: the one interface (engine.py), plain transformers (hf.py) and vLLM
(vllm_engine.py; vLLM itself is imported only when such an engine is built). `make_engine` picks one."""

from __future__ import annotations

from lmflow_ray.errors import UserError
from lmflow_ray.inference.engine import Completion, Engine, SamplingParams
from lmflow_ray.inference.hf import HFEngine
from lmflow_ray.inference.vllm_engine import VLLMEngine

__all__ = ["Completion", "Engine", "SamplingParams", "make_engine"]


def make_engine(kind: str, model, **kw) -> Engine:
    """An engine of `kind` ("hf" | "vllm") for a zoo name, model dir, training output or adapter dir."""
    engines = {"hf": HFEngine, "vllm": VLLMEngine}
    if kind not in engines:
        raise UserError(f"unknown engine '{kind}'; use hf or vllm")
    return engines[kind].load(model, **kw)
