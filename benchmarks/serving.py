"""Serving: requests/s and p50/p99 latency of the OpenAI API, batched vs unbatched, at concurrency 1, 8, 32.

One Ray Serve instance on 127.0.0.1 hosts SmolLM2 (HF engine) twice, as two applications
that differ only in `max_batch_size`: "batched" (32, concurrent requests merged into one
`generate` call by `@serve.batch`) and "unbatched" (1). Optionally a third app on the vLLM
engine (`--vllm`, continuous batching). At each concurrency C, `--requests` chat requests
(greedy, `--max-tokens` new tokens, varied prompts) are sent by C concurrent clients over
HTTP; latency is per request, from send to full response. Status codes other than 200 are
counted (there must be none). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import QUESTIONS  # noqa: E402
from train_throughput import machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, codes, tokens = [], {}, 0

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int):
            nonlocal tokens
            body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                lat.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": n, "rps": round(n / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "status": {str(k): v for k, v in codes.items()}}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 2 x concurrency for C > 8)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each model replica")
    p.add_argument("--vllm", action="store_true", help="also measure an app on the vLLM engine")
    args = p.parse_args()

    from ray import serve

    from lmflow_ray.models.zoo import fetch_model
    from lmflow_ray.runtime import init_ray
    from lmflow_ray.serve.app import build
    from lmflow_ray.serve.config import parse_serve_config

    model = str(fetch_model("smollm2-135m-instruct"))
    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {"batched": {"engine": "hf", "max_batch_size": 32}, "unbatched": {"engine": "hf", "max_batch_size": 1}}
    if args.vllm:
        apps["vllm"] = {"engine": "vllm", "max_model_len": 1024}
    levels = [int(c) for c in args.concurrency.split(",")]
    result = {"machine": {**machine(), "replica_threads": args.threads}, "model": "smollm2-135m-instruct",
              "max_tokens": args.max_tokens, "serving": {}}
    for name, spec in apps.items():
        # One app at a time: the replicas of the others would compete for the same 2 cores.
        cfg = parse_serve_config({"api_key_env": "LMFLOW_RAY_BENCH_NO_KEY", "models": [
            {"name": "smollm2", "path": model, "torch_threads": args.threads, "max_ongoing_requests": 64, **spec}]})
        serve.run(build(cfg), name=name, route_prefix=f"/{name}", blocking=False)
        url = f"http://127.0.0.1:{port}/{name}/v1/chat/completions"
        asyncio.run(load(url, 2, 2, args.max_tokens))  # warm-up
        for c in levels:
            r = asyncio.run(load(url, c, max(args.requests, 2 * c if c > 8 else args.requests), args.max_tokens))
            result["serving"].setdefault(f"c{c}", {})[name] = r
            print(f"{name} c={c}: {r}", file=sys.stderr, flush=True)
        serve.delete(name)
    for c in levels:
        level = result["serving"][f"c{c}"]
        level["batched_over_unbatched_rps"] = round(level["batched"]["rps"] / level["unbatched"]["rps"], 2)
    serve.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
