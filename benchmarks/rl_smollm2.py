"""RAFT vs PPO on SmolLM2-135M-Instruct, and the per-iteration time breakdown of the actor graph.

Task: `configs/raft_smollm2.yaml` / `configs/ppo_smollm2.yaml` (kv2json prompts, rule reward
`kv_json` in [0, 1]: a JSON object in the answer, the whole answer, the prompt's pairs in it),
full finetuning, CPU.

1. `compare`: RAFT and PPO each run for the same wall-clock budget (`--budget` seconds; no new
   iteration starts after it). Reported per method: iterations done, mean sample reward of
   the first and last rollout, peak memory (sum of the resident sets of the driver and every
   Ray worker process, sampled every 0.5 s, minus the idle level before the run; shared pages
   count once per process, so it is an upper bound), and the Table-5 metrics (reward, response_ppl,
   msttr, distinct, unique, length via `lmflow-ray eval`'s `evaluate`) of the starting model and
   of each final policy on the 24 held-out prompts (examples/data/kv2json_heldout.json), from
   which reward gained per minute = (held-out reward after - before) / wall minutes.
2. `breakdown`: RAFT iterations with 1 and 2 HF generation actors and with 1 vLLM actor:
   mean seconds of generate / score / train / sync over the iterations after the first (the
   first includes loading the engines).

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples" / "data" / "kv2json_heldout.json"
REWARD = "lmflow_ray.eval.reward_functions:kv_json"


class PeakRSS(threading.Thread):
    """Peak of the summed RSS (GiB) of this process and all `ray::` worker processes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.base = self.sample()
        self.peak, self.stopped = self.base, threading.Event()

    @staticmethod
    def sample() -> float:
        import psutil

        total = psutil.Process().memory_info().rss
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and p.pid != os.getpid():
                    total += p.info["memory_info"].rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                continue
        return total / 2**30

    def run(self):
        while not self.stopped.wait(0.5):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> float:
        self.stopped.set()
        self.join()
        return round(self.peak - self.base, 2)


def table5(model: str, out: Path) -> dict:
    from lmflow_ray.eval.run import evaluate
    from lmflow_ray.inference.engine import SamplingParams

    report = evaluate(model, str(HELDOUT), ["reward", "response_ppl", "msttr", "distinct", "unique", "length"], out,
                      reward=REWARD, params=SamplingParams(max_tokens=48, temperature=0.0))
    return {k: round(v, 4) for k, v in report["metrics"].items()}


def run_method(kind: str, out: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    from lmflow_ray.align.ppo import run_ppo
    from lmflow_ray.align.raft import run_raft
    from lmflow_ray.config import PPOConfig, RaftConfig
    from lmflow_ray.config_loading import load_config

    cls, fn = (RaftConfig, run_raft) if kind == "raft" else (PPOConfig, run_ppo)
    cfg = load_config(cls, REPO / "configs" / f"{kind}_smollm2.yaml",
                      [f"output_dir={out}", f"data.path={REPO / 'examples/data/kv2json_train.json'}", *overrides])
    mem = PeakRSS()
    mem.start()
    t0 = time.time()
    rows = fn(cfg)
    return {"seconds": round(time.time() - t0, 1), "peak_rss_gib": mem.stop()}, rows


def compare(tmp: Path, budget: float) -> dict:
    before = table5("smollm2-135m-instruct", tmp / "eval_base.json")
    result = {"budget_s": budget, "heldout_before": before}
    for kind in ("raft", "ppo"):
        info, rows = run_method(kind, tmp / kind, [f"{kind}.time_budget_s={budget}", f"{kind}.iterations=50"])
        after = table5(str(tmp / kind / "model"), tmp / f"eval_{kind}.json")
        minutes = info["seconds"] / 60
        result[kind] = {**info, "iterations": len(rows),
                        "rollout_reward_first": round(rows[0]["reward_mean"], 4),
                        "rollout_reward_last": round(rows[-1]["reward_mean"], 4),
                        "heldout_after": after,
                        "heldout_reward_gain_per_min": round((after["reward"] - before["reward"]) / minutes, 4),
                        "rows": rows}
    return result


def breakdown(tmp: Path, iterations: int) -> dict:
    out = {}
    for name, overrides in (("hf_1_actor", ["generation.actors=1"]),
                            ("hf_2_actors", ["generation.actors=2", "generation.cpus_per_actor=1"]),
                            ("vllm_1_actor", ["generation.engine=vllm"])):
        info, rows = run_method("raft", tmp / name, [f"raft.iterations={iterations}", "raft.min_reward=null",
                                                     *overrides])
        later = rows[1:] or rows
        out[name] = {**info, **{k: round(sum(r.get(k, 0.0) for r in later) / len(later), 2)
                                for k in ("gen_s", "score_s", "train_s", "sync_s")},
                     "gen_tokens_per_s": round(sum(r["gen_tokens_per_s"] for r in later) / len(later), 1)}
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=420.0, help="seconds of RAFT and of PPO each")
    p.add_argument("--breakdown-iterations", type=int, default=3)
    p.add_argument("--only", choices=["compare", "breakdown"])
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = {"machine": machine(), "versions": versions(), "model": "smollm2-135m-instruct (full finetuning)"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "breakdown":
            result["compare"] = compare(Path(tmp), args.budget)
        if args.only != "compare":
            result["breakdown"] = breakdown(Path(tmp), args.breakdown_iterations)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
