"""One optimizer step on a DeepSpeed engine: the piece every training loop shares.

`lmflow-ray finetune`'s Ray Train worker (loop.py) and the RL trainer group (align/trainer.py)
both build their engine with `build_engine` (the LR schedule of `lr_lambda`) and call
`optimizer_step` with the G micro-batches of one step. It counts the step's
normalisation units (learned tokens, pairs, response tokens) over all data-parallel ranks,
scales each micro-batch's loss sum so the optimised loss is the mean over the whole global
batch (objectives.micro_batch_loss_scale), runs backward/step for each micro-batch (DeepSpeed
accumulates and applies the optimizer, clipping and scheduler at the boundary), and returns
the global loss and metric sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmflow_ray.lazy_imports import hidden


def deepspeed_for_training():
    """`deepspeed`, set up for a training process.

    On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op in every
    process that starts an engine (~30 s of two compilers), and probes the compiler for every op it
    knows; the op serves only DeepSpeed's inference tensor parallelism (`inference_all_reduce`).
    Training all-reduces go through torch.distributed (gloo / NCCL), so the op is marked unavailable
    and neither the probe nor the build runs. (Measured: the test suite compiled it 3 times, ~300 s
    of CPU, as processes with different build flags invalidated each other's build.)

    MLflow is hidden while DeepSpeed imports (lazy_imports.py): its autotuner, which we never run,
    would import it in every training process.
    """
    with hidden("mlflow"):
        import deepspeed
        import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    return deepspeed


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def build_engine(task, cfg, ds_config: dict, total_steps: int):
    """The task's model in a DeepSpeed engine (torch.distributed already set up) with the job's LR
    schedule over `total_steps` (warmup from `train.warmup_steps` or `warmup_ratio`)."""
    import torch

    model = task.build_model()
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    engine, _, _, _ = deepspeed_for_training().initialize(
        model=model, model_parameters=task.param_groups(model), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_scheduler, warmup, total_steps)),
        dist_init_required=False)
    if engine.zero_optimization_stage() == 0:
        _bounded_allreduce(engine)
    return engine


ALLREDUCE_BUCKET_NUMEL = 25_000_000  # 100 MB of fp32 gradients per all-reduce (PyTorch DDP's order of size)


def _bounded_allreduce(engine) -> None:
    """ZeRO-0's gradient all-reduce without a copy of every gradient.

    At stage 0 DeepSpeed flattens the gradients into buckets of 500M elements before each
    all-reduce: for a model under that size, one contiguous copy of all its gradients and a copy
    back per optimizer step (540 MB each way for a 135M-parameter model in fp32), with one worker
    for a sum over one rank. More workers: buckets of ALLREDUCE_BUCKET_NUMEL. One worker: no
    all-reduce (the mean over one rank is the gradient itself), only what DeepSpeed's all-reduce
    does besides: the optimizer learns the accumulation boundary, and (fp32) a trainable parameter
    without a gradient in this step gets zeros, so AdamW moves it as on every rank of a
    multi-worker run (momentum, weight decay) instead of skipping it.
    """
    import functools

    import torch

    if engine.dp_world_size > 1:
        engine.allreduce_gradients = functools.partial(engine.allreduce_gradients, bucket_size=ALLREDUCE_BUCKET_NUMEL)
        return
    optimizer = engine.optimizer

    def reduce_on_one_rank(*_args, **_kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        if hasattr(optimizer, "set_gradient_accumulation_boundary"):
            optimizer.set_gradient_accumulation_boundary(boundary)
        if boundary and not hasattr(optimizer, "get_grads_for_reduction"):  # bf16 keeps its own fp32 grads
            for p in engine.module.parameters():
                if p.requires_grad and p.grad is None and p.numel():
                    p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = reduce_on_one_rank


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the data-parallel ranks (the values themselves without torch.distributed)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


@dataclass
class StepResult:
    loss: float  # mean over the global batch's units
    units: float  # learned tokens / pairs / response tokens of the global batch
    seen: float  # real (non-pad) tokens of the global batch
    padding: float = 0.0  # pad positions the global batch computed on besides
    stats: dict[str, float] = field(default_factory=dict)  # metric sums over the global batch


def optimizer_step(engine, task, micro: list[dict], world: int) -> StepResult:
    """Forward/backward every micro-batch of one optimizer step; the optimizer steps at the last one."""
    from lmflow_ray.train.objectives import micro_batch_loss_scale

    local_units = sum(task.units(mb) for mb in micro)
    local_seen = float(sum(int(mb["attention_mask"].sum()) for mb in micro))
    local_padding = float(sum(mb["attention_mask"].numel() for mb in micro)) - local_seen
    units, seen, padding = all_sum([local_units, local_seen, local_padding])
    scale = micro_batch_loss_scale(world, len(micro), int(units))
    loss_sum, sums = 0.0, {}
    for mb in micro:
        loss, stats = task.loss(engine, mb)
        engine.backward(loss * scale)
        engine.step()
        loss_sum += float(loss.detach())
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums)
    total_loss, *totals = all_sum([loss_sum, *(sums[k] for k in keys)])
    return StepResult(loss=total_loss / max(units, 1), units=units, seen=seen, padding=padding,
                      stats=dict(zip(keys, totals)))
