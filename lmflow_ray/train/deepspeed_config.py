"""The `deepspeed:` setting of a training job: a shipped ZeRO config by name (configs/deepspeed/:
zero0, zero2, zero3, zero3_offload) or a JSON file, with its "auto" fields filled from the job's
own settings, so that one JSON serves every job (finetune, reward-model, dpo, the RL trainers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmflow_ray.errors import UserError

if TYPE_CHECKING:
    from lmflow_ray.config import FinetuneConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_deepspeed(spec: str) -> dict:
    candidates = [Path(spec), REPO_ROOT / "configs" / "deepspeed" / f"{spec}.json",
                  Path.cwd() / "configs" / "deepspeed" / f"{spec}.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"deepspeed: '{spec}' is neither zero0|zero2|zero3|zero3_offload nor a JSON file path")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid DeepSpeed JSON ({e.msg})") from None
    ds.setdefault("zero_optimization", {"stage": 0})
    return ds


def fill_deepspeed(ds: dict, cfg: FinetuneConfig, bf16: bool) -> dict:
    """Replace "auto" fields from the job config, so one JSON serves every job."""
    t = cfg.train
    gas = cfg.gradient_accumulation_steps
    ds = json.loads(json.dumps(ds))
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = t.micro_batch_size * gas * cfg.scaling.num_workers
    ds["gradient_clipping"] = t.max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", t.lr), ("betas", list(t.betas)), ("weight_decay", t.weight_decay)):
        if params.get(key, "auto") == "auto":
            params[key] = value
    if cfg.scaling.elastic and ds["zero_optimization"].get("stage", 0) in (1, 2):
        ds["zero_optimization"]["elastic_checkpoint"] = True  # shards re-partitioned when the worker count changes
    if not cfg.scaling.use_gpu:
        params["torch_adam"] = True  # DeepSpeed's fused/CPU Adam needs compiled ops
        ds["zero_optimization"].pop("offload_optimizer", None)
        ds["zero_optimization"].pop("offload_param", None)
    return ds
