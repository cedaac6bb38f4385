"""Batch inference over Ray Data: `lmflow-ray infer ... --workers N`.

The dataset is read by Ray Data (`read_dataset`, streamed in blocks), prompts are built and
answered by a pool of N engine actors (`map_batches` with an `ActorPoolStrategy`; each
actor loads one HF or vLLM engine once and answers batches of `batch_size` rows), and the
answers stream back to the driver in dataset order, where the same atomic text2text writer
as single-process `infer` puts them in OUT. Progress (rows, tokens/s, ETA) is printed as
batches arrive. Each actor reserves `cpus_per_worker` Ray CPUs (`gpus_per_worker` GPUs
on GPU clusters), so the pool spreads across the nodes of a cluster.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmflow_ray.inference.engine import SamplingParams


def _rows_to_prompts(batch: dict, dtype: str, engine) -> list[str]:
    if dtype == "text2text":
        return [str(x) for x in batch["input"]]
    if dtype == "text_only":
        return [str(x) for x in batch["text"]]
    prompts = []
    for i in range(len(batch["messages"])):
        msgs = [{"role": m["role"], "content": m["content"]} for m in batch["messages"][i]]
        system = batch["system"][i] if "system" in batch else None
        prompts.append(engine.chat_prompt(msgs, system or None))
    return prompts


class EngineWorker:
    """A Ray Data actor: one engine, many batches."""

    def __init__(self, kind: str, model: str, dtype: str, params: dict, engine_kw: dict):
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from lmflow_ray.inference import make_engine

        self.engine = make_engine(kind, model, **engine_kw)
        self.dtype, self.params = dtype, SamplingParams(**params)

    def __call__(self, batch: dict) -> dict:
        prompts = _rows_to_prompts(batch, self.dtype, self.engine)
        results = self.engine.generate(prompts, self.params, add_special_tokens=self.dtype != "conversation")
        inputs, outputs, tokens = [], [], []
        for prompt, group in zip(prompts, results):
            for c in group:
                inputs.append(prompt)
                outputs.append(c.text)
                tokens.append(len(c.token_ids))
        return {"input": inputs, "output": outputs, "tokens": tokens}


def answer_with_ray(model: str, data: str | Path, dtype: str, total: int, engine: str, params: SamplingParams,
                    batch_size: int, workers: int, engine_kw: dict, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 0.0):
    """Yield (input, output, tokens) in dataset order, answered by `workers` engine actors."""
    from dataclasses import asdict

    import ray

    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.runtime import init_ray

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = read_dataset(data, dtype, for_prompt=True)[0].map_batches(
        EngineWorker, fn_constructor_kwargs={"kind": engine, "model": str(model), "dtype": dtype,
                                             "params": asdict(params), "engine_kw": engine_kw},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker, batch_format="numpy")
    t0, done, tokens, last = time.time(), 0, 0, 0.0
    for row in ds.iter_rows():
        yield row["input"], row["output"]
        done += 1
        tokens += int(row["tokens"])
        now = time.time()
        if now - last > 5 or done == total * params.n:
            last = now
            rate = done / (now - t0)
            eta = (total * params.n - done) / rate if rate else 0
            print(f"infer: {done}/{total * params.n} answers, {tokens / (now - t0):.1f} tokens/s, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)
