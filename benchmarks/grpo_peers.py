"""GRPO side by side with TRL: `lmflow-ray ppo --set ppo.estimator=grpo` vs TRL's `GRPOTrainer`, the same task.

Task: SmolLM2-135M-Instruct (full finetuning, float32, CPU) on the kv2json prompts
(examples/data/kv2json_train.json) with the same rule reward (`kv_json`, in [0, 1]), the same
group size (4 samples per prompt), prompts per rollout (16), max new tokens (48), sampling
temperature (1.0), learning rate (1e-5, constant), KL coefficient to the starting model (0.02),
and the same optimisation of each rollout: 64 samples in micro-batches of 8, two passes (16 optimizer
steps), loss normalised over the tokens of the batch (TRL's default `dapo` loss; ours sums the clipped
surrogate over tokens / the batch's token count). Each side gets the same wall-clock budget (`--budget`
seconds; no new rollout starts after it) and the whole machine: ours runs its Ray actor graph (one
HF generation actor and one trainer, `--threads` CPUs = torch threads each: the phases take turns),
TRL one process with torch's default threads (one per core).
Each side runs in its own process, one after the other.

Reported per side: rollouts (optimizer steps) done, generated tokens/s over the run, peak memory (RSS of
the process and its children, sampled every 0.5 s), and the held-out reward (24 prompts of
examples/data/kv2json_heldout.json, greedy, the same `evaluate` for both) before and after, from which
held-out reward gained per minute of run. Prints one JSON object; ratios are ours / TRL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples" / "data" / "kv2json_heldout.json"
TRAIN = REPO / "examples" / "data" / "kv2json_train.json"
REWARD = "lmflow_ray.eval.reward_functions:kv_json"
SETTINGS = {"group": 4, "prompts_per_rollout": 16, "max_tokens": 48, "temperature": 1.0, "lr": 1e-5, "kl": 0.02,
            "micro_batch": 8, "passes": 2}

OURS = r"""
import json, sys, time
from lmflow_ray.align.ppo import run_ppo
from lmflow_ray.config import PPOConfig
from lmflow_ray.config_loading import load_config

repo, out, budget, s, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
cfg = load_config(PPOConfig, f"{repo}/configs/ppo_smollm2.yaml", [
    f"output_dir={out}", f"data.path={repo}/examples/data/kv2json_train.json", "ppo.estimator=grpo",
    f"ppo.time_budget_s={budget}", "ppo.iterations=1000", f"ppo.prompts_per_iteration={s['prompts_per_rollout']}",
    f"ppo.samples_per_prompt={s['group']}", f"ppo.kl_coef={s['kl']}", f"generation.max_tokens={s['max_tokens']}",
    f"generation.temperature={s['temperature']}", f"train.lr={s['lr']}", "train.lr_scheduler=constant",
    f"train.micro_batch_size={s['micro_batch']}", f"train.global_batch_size={s['micro_batch']}",
    "scaling.num_workers=1", f"train.num_epochs={s['passes']}",
    f"generation.cpus_per_actor={threads}", f"scaling.cpus_per_worker={threads}"])
t0 = time.time()
rows = run_ppo(cfg)
seconds = time.time() - t0
tokens = sum(r["response_len"] * s["group"] * s["prompts_per_rollout"] for r in rows)
# one worker, one micro-batch per optimizer step (set above): the same count TRL's side derives
steps_per_rollout = s["group"] * s["prompts_per_rollout"] // s["micro_batch"] * s["passes"]
print("RESULT " + json.dumps({"seconds": seconds, "rollouts": len(rows), "optimizer_steps": steps_per_rollout * len(rows),
                              "generated_tokens": tokens, "reward_first": rows[0]["reward_mean"],
                              "reward_last": rows[-1]["reward_mean"], "model": f"{out}/model"}))
"""

TRL = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from lmflow_ray.eval.reward_functions import kv_json

model, train, out, budget, s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5])
rows = json.loads(open(train).read())["instances"]
prompts = Dataset.from_list([{"prompt": [m for m in r["messages"] if m["role"] == "user"][:1]} for r in rows])
generated = [0]

def reward(prompts, completions, completion_ids, **kw):
    generated[0] += sum(len(c) for c in completion_ids)
    return kv_json([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])

class Budget(TrainerCallback):  # like ours: no new rollout once the budget is spent
    def __init__(self, every):
        self.t0, self.every = time.time(), every
    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0 and time.time() - self.t0 > budget:
            control.should_training_stop = True

steps_per_rollout = s["group"] * s["prompts_per_rollout"] // s["micro_batch"]
args = GRPOConfig(
    output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
    max_steps=100000, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
    per_device_train_batch_size=s["micro_batch"], gradient_accumulation_steps=1,
    steps_per_generation=steps_per_rollout, num_generations=s["group"], num_iterations=s["passes"],
    max_completion_length=s["max_tokens"], temperature=s["temperature"], beta=s["kl"], seed=0,
)
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                      callbacks=[Budget(steps_per_rollout * s["passes"])])
t0 = time.time()
trainer.train()
seconds = time.time() - t0
trainer.save_model(f"{out}/model")
trainer.processing_class.save_pretrained(f"{out}/model")
logs = [h for h in trainer.state.log_history if "reward" in h]
steps = trainer.state.global_step
print("RESULT " + json.dumps({"seconds": seconds, "rollouts": steps // (steps_per_rollout * s["passes"]),
                              "optimizer_steps": steps, "generated_tokens": generated[0],
                              "reward_first": logs[0]["reward"], "reward_last": logs[-1]["reward"],
                              "model": f"{out}/model"}))
"""


def peak_rss_run(cmd: list[str], log: Path) -> tuple[dict, float]:
    """Run `cmd`; (its RESULT dict, peak GiB of the summed RSS of it and its children, sampled every 0.5 s)."""
    import psutil

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        peak, done = [0.0], threading.Event()

        def sample():
            while not done.wait(0.5):
                try:
                    root = psutil.Process(proc.pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak[0] = max(peak[0], total / 2**30)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        code = proc.wait()
        done.set()
        watcher.join()
    text = log.read_text()
    line = next((x for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"{cmd[2][:40]!r} exited {code}:\n{text[-3000:]}")
    return json.loads(line[7:]), round(peak[0], 2)


def heldout_reward(model: str, out: Path) -> float:
    from lmflow_ray.eval.run import evaluate
    from lmflow_ray.inference.engine import SamplingParams

    report = evaluate(model, str(HELDOUT), ["reward"], out, reward=REWARD,
                      params=SamplingParams(max_tokens=SETTINGS["max_tokens"], temperature=0.0))
    return round(report["metrics"]["reward"], 4)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=300.0, help="seconds of training per side")
    p.add_argument("--sides", default="ours,trl")
    p.add_argument("--threads", type=int, default=2,
                   help="ours: CPUs (= torch threads) of the generation actor and of the trainer; its phases take "
                        "turns, so each may use the whole machine as TRL's one process does")
    args = p.parse_args()

    import trl

    from lmflow_ray.models.zoo import fetch_model

    model = str(fetch_model("smollm2-135m-instruct"))
    tmp = Path(tempfile.mkdtemp(prefix="grpo-peers-"))
    before = heldout_reward(model, tmp / "eval_base.json")
    result = {"machine": machine(), "versions": {**versions(), "trl": trl.__version__}, "ours_threads": args.threads,
              "model": "smollm2-135m-instruct (full finetuning, float32)", "settings": SETTINGS,
              "budget_s": args.budget, "heldout_reward_before": before, "logs": str(tmp), "sides": {}}
    for side in args.sides.split(","):
        out = tmp / side
        if side == "ours":
            cmd = [sys.executable, "-c", OURS, str(REPO), str(out), str(args.budget), json.dumps(SETTINGS),
                   str(args.threads)]
        else:
            cmd = [sys.executable, "-c", TRL, model, str(TRAIN), str(out), str(args.budget), json.dumps(SETTINGS)]
        entry: dict = {}
        try:
            run, peak = peak_rss_run(cmd, tmp / f"{side}.log")
            after = heldout_reward(run.pop("model"), tmp / f"eval_{side}.json")
            minutes = run["seconds"] / 60
            entry = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()},
                     "peak_rss_gib": peak, "generated_tokens_per_s": round(run["generated_tokens"] / run["seconds"], 1),
                     "heldout_reward_after": after,
                     "heldout_reward_gain_per_min": round((after - before) / minutes, 4)}
        except Exception as e:  # noqa: BLE001 - a side that cannot run here is reported, not fatal
            entry["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
        print(f"{side}: {entry}", file=sys.stderr, flush=True)
        result["sides"][side] = entry
    ours, theirs = result["sides"].get("ours", {}), result["sides"].get("trl", {})
    if ours and theirs and "error" not in ours and "error" not in theirs:
        result["ours_over_trl"] = {
            "heldout_reward_gain_per_min": round(ours["heldout_reward_gain_per_min"]
                                                 / max(theirs["heldout_reward_gain_per_min"], 1e-9), 3),
            "generated_tokens_per_s": round(ours["generated_tokens_per_s"] / theirs["generated_tokens_per_s"], 3),
            "peak_rss": round(ours["peak_rss_gib"] / theirs["peak_rss_gib"], 3)}
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
