"""Reward modeling and DPO on SmolLM2-135M-Instruct (LoRA), from the shipped configs.

Runs `configs/rm_smollm2_lora.yaml` and `configs/dpo_smollm2_lora.yaml` (1 worker, CPU)
on examples/data/preference_tiny.json with 40 held-out pairs, and reports the held-out
figures before training (step 0) and at the end: pairwise accuracy and loss of the
reward model; reward accuracy, log-prob margin and KL proxy of DPO; seconds per run.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(kind: str, config: str, out: Path) -> dict:
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune
    from lmflow_ray.train.tasks import TASKS

    cfg = load_config(TASKS[kind].config_class, REPO / config,
                      [f"output_dir={out}", f"data.path={REPO / 'examples/data/preference_tiny.json'}"])
    t0 = time.time()
    run_finetune(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    keys = [k for k in evals[0] if k.startswith("eval_")]
    return {"config": config, "seconds": round(time.time() - t0, 1), "steps": rows[-1]["step"],
            "before": {k: round(evals[0][k], 4) for k in keys}, "after": {k: round(evals[-1][k], 4) for k in keys}}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {"machine": machine(), "versions": versions(), "model": "smollm2-135m-instruct (LoRA r 8)",
                "reward_model": run("reward-model", "configs/rm_smollm2_lora.yaml", Path(tmp) / "rm"),
                "dpo": run("dpo", "configs/dpo_smollm2_lora.yaml", Path(tmp) / "dpo")}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
