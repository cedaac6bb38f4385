"""The RL trainer that lives for the run vs the one it replaced (a Ray Train run per iteration), same machine, same run.

For each case (tiny-llama RAFT / GRPO / PPO with `configs/*_tiny.yaml`, and SmolLM2 RAFT / GRPO with
`configs/*_smollm2.yaml` on kv2json) the same command runs twice: once from a checkout of the
`--before` commit (the per-iteration `run_finetune` update, weights synced from the update's saved
model directory) and once from this checkout. Each run is its own `lmflow-ray` process (its own
local Ray cluster). Reported per run: wall seconds, mean generate / score / train / sync seconds
over the iterations after the first (the first also loads the engines), sync bytes and transport
where recorded, the mean rollout reward of the first and last iteration, and files written under
OUT during the run.

Prints one JSON object on stdout.
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
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("gen_s", "score_s", "train_s", "sync_s")

CASES = {
    "tiny_raft": ("raft", "raft_tiny", ["raft.iterations=4", "data.path=examples/data/raft_prompts_tiny.json"]),
    "tiny_grpo": ("ppo", "ppo_tiny", ["ppo.estimator=grpo", "ppo.iterations=4",
                                       "data.path=examples/data/raft_prompts_tiny.json"]),
    "tiny_ppo": ("ppo", "ppo_tiny", ["ppo.iterations=4", "data.path=examples/data/raft_prompts_tiny.json"]),
    "smollm2_raft": ("raft", "raft_smollm2", ["raft.iterations=3", "raft.min_reward=null"]),
    "smollm2_grpo": ("ppo", "ppo_smollm2", ["ppo.estimator=grpo", "ppo.iterations=3"]),
}


def run(checkout: Path, command: str, config: str, overrides: list[str], out: Path) -> dict:
    args = [sys.executable, "-m", "lmflow_ray", command, "--config", str(checkout / "configs" / f"{config}.yaml"),
            "--set", f"output_dir={out}"]
    for o in overrides:
        key, value = o.split("=", 1)
        args += ["--set", f"{key}={checkout / value}" if key == "data.path" else o]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.time()
    proc = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    later = rows[1:] or rows
    result = {"wall_s": round(wall, 1), "iterations": len(rows),
              **{k: round(sum(r.get(k, 0.0) for r in later) / len(later), 2) for k in KEYS},
              "reward_first": round(rows[0]["reward_mean"], 4), "reward_last": round(rows[-1]["reward_mean"], 4),
              "files_under_out": sum(1 for p in out.rglob("*") if p.is_file())}
    if "sync_bytes" in rows[-1]:
        result.update(sync_bytes=rows[-1]["sync_bytes"], sync_transport=rows[-1]["sync_transport"])
    return result


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="ba98f6b", help="commit with the per-iteration Ray Train update")
    p.add_argument("--cases", default="tiny_raft,tiny_grpo,tiny_ppo", help=f"comma-separated of {', '.join(CASES)}")
    args = p.parse_args()
    result = {"machine": machine(), "versions": versions(), "before": args.before}
    with tempfile.TemporaryDirectory(prefix="rltg") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            for name in args.cases.split(","):
                command, config, overrides = CASES[name]
                result[name] = {label: run(checkout, command, config, overrides, Path(tmp) / f"{name}_{label}")
                                for label, checkout in (("before", before), ("after", REPO))}
                b, a = result[name]["before"], result[name]["after"]
                if "error" not in b and "error" not in a:
                    result[name]["train_s_ratio"] = round(b["train_s"] / max(a["train_s"], 1e-9), 1)
                    result[name]["wall_s_ratio"] = round(b["wall_s"] / a["wall_s"], 2)
                print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
