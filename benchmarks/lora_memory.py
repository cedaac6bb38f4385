"""LoRA vs full finetuning: peak memory, speed and trainable parameters of `lmflow-ray finetune`.

Two `run_finetune` runs on the same model, the same generated conversations (the generator
of train_throughput.py) and the same steps: 1 worker, ZeRO-0, fp32, `--steps` steps of
`--micro-batch` samples cut to `--max-length` tokens (no packing). The only difference is
`lora.enabled` (r 8, alpha 16, all attention and MLP projections, as configs/sft_smollm2_lora.yaml).
Figures per run: peak RSS of the training worker (`max_rss_mb` of metrics.jsonl), tokens/s
of the training loop (last metrics row), trainable parameters; then LoRA / full ratios.
Each run's worker is a fresh Ray actor process, so its peak RSS is its own. Prints one
JSON object on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import MODELS, machine, make_conversations, versions, write_dataset

LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def trainable_parameters(model_path: str) -> dict:
    """Trainable parameter counts of the full model and of the same model with LoRA applied."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmflow_ray.models.peft_utils import apply_lora

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    full = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = apply_lora(model, LORA["r"], LORA["alpha"], LORA["dropout"], LORA["target_modules"], False)
    return {"full": full, "lora": sum(p.numel() for p in lora.parameters() if p.requires_grad)}


def run(model: str, data: Path, out: Path, lora: bool, args) -> dict:
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune

    base = {
        "model": model,
        "data": {"path": str(data), "max_length": args.max_length},
        "output_dir": str(out),
        "deepspeed": "zero0",
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
        "train": {"num_epochs": 1, "max_steps": args.steps, "micro_batch_size": args.micro_batch, "lr": args.lr,
                  "dtype": "float32", "logging_steps": 1, "save_steps": 0},
        "lora": LORA if lora else {"enabled": False},
    }
    wall = time.time()
    run_finetune(load_config(FinetuneConfig, None, [], base=base))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1]
    return {
        "steps": last["step"], "max_rss_mb": round(max(r["max_rss_mb"] for r in rows), 0),
        "tokens_per_s": round(last["tokens_per_s"], 2), "tokens_seen": last["tokens_seen"],
        "elapsed_s": round(last["elapsed_s"], 1), "wall_s_incl_startup_and_save": round(time.time() - wall, 1),
        "first_loss": round(rows[0]["loss"], 4), "last_loss": round(last["loss"], 4),
    }


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    # 1 by default: on a shared machine, 2 OpenMP threads on 2 cores stall whenever another process
    # runs (steps seen 50x slower than with 1 thread), which would swamp the comparison.
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    args = p.parse_args()

    from lmflow_ray.models.zoo import fetch_model

    model = MODELS[args.model]
    params = trainable_parameters(str(fetch_model(model)))
    convs = make_conversations(args.steps * args.micro_batch, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmpdir:
        tmp = Path(tmpdir)
        write_dataset(convs, tmp / "sft.json")
        full = run(model, tmp / "sft.json", tmp / "full", False, args)
        lora = run(model, tmp / "sft.json", tmp / "lora", True, args)
    return {
        "benchmark": "lora_memory", "model": model, "steps": args.steps, "micro_batch": args.micro_batch,
        "max_length": args.max_length, "threads": args.threads, "lora_settings": LORA,
        "trainable_params": params, "full": full, "lora": lora,
        "ratio_lora_over_full": {
            "max_rss": round(lora["max_rss_mb"] / full["max_rss_mb"], 3),
            "tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
            "trainable_params": round(params["lora"] / params["full"], 5),
        },
        "machine": machine(), "versions": versions(),
    }


if __name__ == "__main__":
    # Ray, DeepSpeed and the training loop print progress on fd 1; keep stdout for the JSON alone.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    result = main()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
