"""Batch inference side by side with Ray's own: `lmflow-ray infer --engine vllm --workers N` vs `ray.data.llm`
(its vLLM engine processor), both on vLLM over Ray Data, the same prompts and settings.

Each side runs as a user runs it, in its own process with its own local Ray cluster (8 logical CPUs, as
`lmflow-ray` starts one), one after the other: `--prompts` distinct chat prompts (SmolLM2-135M-Instruct,
float32, greedy, up to `--max-tokens` new tokens, the same context length and KV-cache size), N engine
actors of one CPU each, batches of `--batch-size` rows. ray.data.llm's processor asks for a GPU per
engine by default; here it gets a one-CPU placement bundle (`placement_group_config`), as its docs
describe for custom placements. Timed: the whole command, start-up included (what a user waits for).
Generated tokens are counted the same way for both sides (each answer re-tokenized), and the greedy
answers are compared. Prints one JSON object: per side and worker count wall seconds, answers,
tokens/s; then ours / ray.data.llm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import QUESTIONS  # noqa: E402
from serving_peers import stop  # noqa: E402
from train_throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "ray_data_llm")

RAY_DATA_LLM = r"""
import json, sys
import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

model, data, out, workers, batch, max_tokens, max_len = sys.argv[1:8]
ray.init(num_cpus=8, logging_level="ERROR")  # logical CPUs, as `lmflow-ray` starts its local cluster
rows = json.loads(open(data).read())["instances"]
config = vLLMEngineProcessorConfig(
    model_source=model, engine_kwargs={"max_model_len": int(max_len), "dtype": "float32", "enforce_eager": True},
    # (N, N): a fixed pool of N engines, as `--workers N` (an int N means an autoscaling pool from 1 to N,
    # which stays at 1 engine here: that engine takes every batch at once, max_concurrent_batches=8)
    concurrency=(int(workers), int(workers)), batch_size=int(batch),
    placement_group_config={"bundles": [{"CPU": 1}]},  # its default asks for a GPU per engine
)
processor = build_processor(
    config,
    preprocess=lambda row: {"messages": row["messages"],
                            "sampling_params": {"temperature": 0.0, "max_tokens": int(max_tokens)}},
    postprocess=lambda row: {"input": row["messages"][-1]["content"], "output": row["generated_text"]},
)
answers = processor(ray.data.from_items(rows)).take_all()
json.dump({"type": "text2text", "instances": answers}, open(out, "w"))
"""


def write_prompts(path: Path, n: int) -> None:
    """`n` distinct chat prompts (distinct so no side gains from prefix caching of repeats)."""
    rows = [{"messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})"}]}
            for i in range(n)]
    path.write_text(json.dumps({"type": "conversation", "instances": rows}))


def run_side(side: str, model: str, data: Path, out: Path, workers: int, batch: int, max_tokens: int, max_len: int,
             kv_gb: int, logs: Path) -> float:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gb), "TOKENIZERS_PARALLELISM": "false",
           "RAY_TMPDIR": str(logs)}  # its own Ray cluster under logs/: `stop` leaves other clusters alone
    env.pop("RAY_ADDRESS", None)
    if side == "ours":
        cmd = [sys.executable, "-m", "lmflow_ray", "infer", "--model", model, "--engine", "vllm", "--data", str(data),
               "--out", str(out), "--workers", str(workers), "--batch-size", str(batch), "--max-tokens",
               str(max_tokens), "--temperature", "0"]
    else:
        cmd = [sys.executable, "-c", RAY_DATA_LLM, model, str(data), str(out), str(workers), str(batch),
               str(max_tokens), str(max_len)]
    log = logs / f"{side}-{workers}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=3600)
        finally:
            stop(proc, logs)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{side} exited {code}:\n{log.read_text()[-3000:]}")
    return wall


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--workers", default="1,2", help="engine actors per run (comma-separated levels)")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=int, default=2)
    args = p.parse_args()

    import ray
    import vllm
    from transformers import AutoTokenizer

    from lmflow_ray.models.zoo import fetch_model

    model = str(fetch_model("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(model)
    logs = Path(tempfile.mkdtemp(prefix="batch-peers-"))
    data = logs / "prompts.json"
    write_prompts(data, args.prompts)
    result = {"machine": machine(), "ray": ray.__version__, "vllm": vllm.__version__,
              "model": "smollm2-135m-instruct (float32)", "prompts": args.prompts, "max_tokens": args.max_tokens,
              "greedy": True, "batch_size": args.batch_size, "max_model_len": args.max_model_len,
              "kv_cache_gb": args.kv_cache_gb, "cpus_per_engine": 1, "logs": str(logs), "sides": {}}
    texts: dict[tuple[str, int], dict[str, str]] = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        for side in args.sides.split(","):
            out = logs / f"{side}-{workers}.json"
            entry: dict = {}
            try:
                wall = run_side(side, model, data, out, workers, args.batch_size, args.max_tokens, args.max_model_len,
                                args.kv_cache_gb, logs)
                rows = json.loads(out.read_text())["instances"]
                tokens = sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in rows)
                texts[(side, workers)] = {r["input"]: r["output"] for r in rows}
                entry = {"wall_s": round(wall, 1), "answers": len(rows), "generated_tokens": tokens,
                         "tokens_per_s": round(tokens / wall, 1)}
            except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                entry["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
            print(f"{side} workers={workers}: {entry}", file=sys.stderr, flush=True)
            result["sides"].setdefault(side, {})[f"workers_{workers}"] = entry
        ours, theirs = result["sides"].get("ours", {}).get(f"workers_{workers}"), \
            result["sides"].get("ray_data_llm", {}).get(f"workers_{workers}")
        if ours and theirs and "error" not in ours and "error" not in theirs:
            a, b = texts[("ours", workers)], texts[("ray_data_llm", workers)]
            # the user-turn text ours records is the chat prompt; match answers by the question they contain
            same = sum(1 for q, text in b.items() if any(q in k and v == text for k, v in a.items()))
            result.setdefault("ours_over_ray_data_llm", {})[f"workers_{workers}"] = {
                "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                "wall": round(ours["wall_s"] / theirs["wall_s"], 3), "identical_answers": same}
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
