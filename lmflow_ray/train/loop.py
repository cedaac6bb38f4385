"""The per-worker training loop: one Ray Train worker, one DeepSpeed engine.

Runs inside `TorchTrainer` workers (Ray has already initialised torch.distributed: gloo
on CPU, nccl on GPU). Each optimizer step takes G micro-batches from this worker's
dataset shard, normalises the loss by the learned tokens of the whole global batch
(objectives.py), and lets DeepSpeed do ZeRO sharding, accumulation and clipping.

Every `save_steps` the workers write a DeepSpeed checkpoint (each rank its own shard
files) plus `trainer_state.json` and report it to Ray Train, which gathers them in one
checkpoint directory. A restart (after a worker died, or `resume_from`) reloads the
engine, optimizer and scheduler, and skips the micro-batches of the current epoch that
were already consumed. Rank 0 writes `metrics.jsonl`, prints progress, and saves the final
model in HF format, then reloads it with plain transformers to check the logits match.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

CHECKPOINT_TAG = "ds"
STATE_FILE = "trainer_state.json"


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def build_model(cfg, plan, head: str = "causal"):
    """The model to train: a causal LM, or (head="reward") the same backbone with a one-score head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmflow_ray.models.loading import set_rope_scaling
    from lmflow_ray.models.peft_utils import apply_lora

    dtype = torch.bfloat16 if plan["bf16"] else torch.float32
    hf_config = AutoConfig.from_pretrained(plan["model_path"], trust_remote_code=cfg.trust_remote_code)
    if cfg.rope_scaling:
        set_rope_scaling(hf_config, dict(cfg.rope_scaling))
    kwargs = {}
    if cfg.lora.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    cls = AutoModelForCausalLM
    if head == "reward":
        cls = AutoModelForSequenceClassification
        hf_config.num_labels = 1
        hf_config.pad_token_id = plan["pad_id"]  # the score is read at the last non-pad token
    model = cls.from_pretrained(
        plan["model_path"], config=hf_config, dtype=dtype, use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code, **kwargs,
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.lora.enabled:
        lo = cfg.lora
        model = apply_lora(model, lo.r, lo.alpha, lo.dropout, lo.target_modules, cfg.train.gradient_checkpointing,
                           task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    return model


class MetricsLog:
    """metrics.jsonl on rank 0: rows after the restored step are dropped on restart."""

    def __init__(self, path: Path, restored_step: int):
        self.path = path
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= restored_step:
                    rows.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _save_checkpoint(engine, state: dict, metrics: dict, rank: int):
    import ray.train

    with tempfile.TemporaryDirectory(prefix="lmflow-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine, resume_path: str | None, world: int, rank: int):
    """Latest checkpoint of this run (after a restart), else the one `resume_from` named.

    An elastic run (or `resume_from` with another num_workers) may come back with another worker
    count than the checkpoint's. Elastic runs save ZeRO-1/2 shards in DeepSpeed's elastic layout
    (`elastic_checkpoint`): the fp32 master weights and AdamW moments of every saved rank are
    merged and re-partitioned over the new ranks. Other checkpoints keep their weights, schedule and
    step but restart the moments (said on the console).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_path:
        ckpt = ray.train.Checkpoint(resume_path)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        shards = sorted(Path(d, CHECKPOINT_TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                        key=lambda f: int(f.name.split("_")[3]))
        if len(shards) in (0, world):
            engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
        else:
            _load_resharded(engine, d, shards, world, rank)
        return json.loads(Path(d, STATE_FILE).read_text())


def _load_resharded(engine, d: str, shards: list, world: int, rank: int) -> None:
    """Load a ZeRO-1/2 checkpoint written by `len(shards)` ranks onto `world` ranks."""
    import torch

    zero = engine._config.zero_config
    keep = zero.load_from_fp32_weights
    zero.load_from_fp32_weights = False  # the engine cannot read shards of another layout: module weights first
    try:
        engine.load_checkpoint(d, tag=CHECKPOINT_TAG, load_optimizer_states=False)
    finally:
        zero.load_from_fp32_weights = keep
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in shards]
    elastic = not isinstance(states[0]["base_optimizer_state"], dict)
    for state in states:  # torch's AdamW keeps its step per parameter (restored with the moments), not per group
        state.setdefault("base_optimizer_state_step", None)
    if elastic:  # merge every saved rank's fp32 weights and moments, cut them for this layout
        opt = engine.optimizer
        keep = opt.elastic_checkpoint
        opt.elastic_checkpoint = True  # read as elastic even where this run saves rigid shards
        try:
            opt.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        finally:
            opt.elastic_checkpoint = keep
    if rank == 0:
        print(f"[lmflow-ray] checkpoint of {len(shards)} workers loaded on {world}: weights, schedule and step "
              + ("restored, optimizer state re-partitioned" if elastic else "restored; optimizer moments restart (the "
                 "checkpoint was not written by an elastic run)"), flush=True)


def _gather_state_dict(engine, stage: int):
    if stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def _save_model(engine, stage: int, rank: int, out: Path, tokenizer_path: str, probe, kind: str = "causal"):
    """Save OUT/model (HF format) and verify it: reload with transformers, compare logits (or reward scores)."""
    import torch

    engine.module.eval()
    with torch.no_grad():
        ref = engine(input_ids=probe).logits.float()
    state_dict = _gather_state_dict(engine, stage)
    if rank != 0:
        return None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = out / "model"
    engine.module.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        if kind == "reward":  # the base's own config has no one-score head: say so
            reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=ref.dtype, num_labels=1, pad_token_id=engine.module.config.pad_token_id)
        else:
            reloaded = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=ref.dtype)
    else:
        cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        reloaded = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits.float()
    torch.save({"input_ids": probe, "logits": ref}, out / "save_check.pt")
    return float((got - ref).abs().max())


def train_worker(args: dict) -> None:
    import ray.train
    import torch

    from lmflow_ray.config import config_class
    from lmflow_ray.models.peft_utils import lisa_select
    from lmflow_ray.train.step import deepspeed_for_training, optimizer_step
    from lmflow_ray.train.tasks import make_task

    plan = args["plan"]
    cfg = config_class(plan["task"]).model_validate(args["config"])
    task = make_task(plan["task"], cfg, plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(plan["output_dir"])
    steps_per_epoch, total_steps = plan["steps_per_epoch"], plan["total_steps"]
    # The global batch is fixed; an elastic run that lost workers accumulates more micro-batches per step.
    gas = plan["global_batch"] // (cfg.train.micro_batch_size * world)
    ds_config = {**plan["ds_config"], "gradient_accumulation_steps": gas, "train_batch_size": plan["global_batch"]}
    torch.manual_seed(cfg.seed)

    model = task.build_model()
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    engine, _, _, _ = deepspeed_for_training().initialize(
        model=model,
        model_parameters=task.param_groups(model),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_scheduler, warmup, total_steps)),
        dist_init_required=False,
    )
    stage = plan["ds_config"]["zero_optimization"]["stage"]
    task.setup(engine)
    state = _restore(engine, plan.get("resume_checkpoint"), world, rank) \
        or {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0}
    log = MetricsLog(out / "metrics.jsonl", state["step"]) if rank == 0 else None
    if rank == 0 and state["step"]:
        print(f"[lmflow-ray] resumed at step {state['step']} (epoch {state['epoch']}) on {world} worker(s)", flush=True)
    lisa_layers = None
    if cfg.lisa.enabled:
        lisa_layers = lisa_select(engine.module, cfg.lisa.active_layers, state["step"] // cfg.lisa.interval_steps, cfg.seed)

    shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan.get("has_eval") else None
    pad_id = plan["pad_id"]
    probe = None
    t0, steps_timed = time.time(), 0
    window_tokens, window_start = 0.0, t0  # tokens/s is measured over the steps since the last log line
    done = state["step"] >= total_steps
    if eval_shard is not None and state["step"] == 0 and not done:
        # The starting point of every eval curve (e.g. a reward model's ~50% accuracy before training).
        start = {"step": 0, "epoch": 0, **task.evaluate(engine, eval_shard, t.micro_batch_size, pad_id)}
        if rank == 0:
            log.write({**start, "time": time.time()})
            print("[lmflow-ray] step 0 eval: " + " ".join(f"{k} {v:.4f}" for k, v in start.items()
                                                          if k.startswith("eval_")), flush=True)
    while not done and state["epoch"] < t.num_epochs:
        batches = iter(shard.iter_torch_batches(batch_size=t.micro_batch_size, drop_last=True,
                                                collate_fn=lambda b: task.collate(b, pad_id)))
        for _ in range(state["step_in_epoch"] * gas):
            next(batches)  # already trained on before the restart
        while state["step_in_epoch"] < steps_per_epoch:
            engine.module.train()
            micro = [next(batches) for _ in range(gas)]
            if probe is None:
                probe = micro[0]["input_ids"][:2, :64].clone()
            result = optimizer_step(engine, task, micro, world)
            global_tokens, global_seen = result.units, result.seen
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["tokens"] += int(global_seen)
            window_tokens += global_seen
            steps_timed += 1
            if cfg.lisa.enabled and state["step"] % cfg.lisa.interval_steps == 0:
                lisa_layers = lisa_select(engine.module, cfg.lisa.active_layers,
                                          state["step"] // cfg.lisa.interval_steps, cfg.seed)
            done = state["step"] >= total_steps
            is_log = state["step"] % t.logging_steps == 0 or done
            is_save = bool(t.save_steps) and state["step"] % t.save_steps == 0 and not done
            is_eval = eval_shard is not None and (done or (t.eval_steps and state["step"] % t.eval_steps == 0))
            if not (is_log or is_save or is_eval):
                continue
            elapsed = time.time() - t0
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": state["step"], "epoch": state["epoch"], "loss": result.loss,
                "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                **task.report(result.stats, max(global_tokens, 1)),
                "tokens_per_s": window_tokens / max(time.time() - window_start, 1e-9),
                task.unit: int(global_tokens),
                "tokens_seen": state["tokens"], "elapsed_s": elapsed,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            if lisa_layers is not None:
                metrics["lisa_layers"] = lisa_layers
            if is_eval:
                metrics.update(task.evaluate(engine, eval_shard, t.micro_batch_size, plan["pad_id"]))
            if rank == 0:
                eta = (total_steps - state["step"]) * elapsed / max(steps_timed, 1)
                log.write({**metrics, "time": time.time()})
                ev = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
                print(f"[lmflow-ray] step {state['step']}/{total_steps} loss {metrics['loss']:.4f}{ev} "
                      f"lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)
            if is_save:
                _save_checkpoint(engine, dict(state), metrics, rank)
            window_tokens, window_start = 0.0, time.time()
            if done:
                break
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0

    if probe is None:  # resumed a finished run: nothing new to train on, probe any batch
        first = next(iter(shard.iter_torch_batches(batch_size=1, collate_fn=lambda b: task.collate(b, pad_id))))
        probe = first["input_ids"][:, :64]
    diff = _save_model(engine, stage, rank, out, plan["tokenizer_path"], probe, task.model_kind)
    final = {"step": state["step"], "epoch": state["epoch"], "final": True, "tokens_seen": state["tokens"]}
    if rank == 0:
        final["save_check_max_abs_diff"] = diff
    _save_checkpoint(engine, dict(state), final, rank)
