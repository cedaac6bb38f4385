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
import resource
import tempfile
import time
from pathlib import Path

import ray.train
import torch

from lmflow_ray.models.peft_utils import lisa_select
from lmflow_ray.models.zoo import is_adapter
from lmflow_ray.tracking import MetricsLog
from lmflow_ray.train.plan import Plan
from lmflow_ray.train.step import build_engine, optimizer_step
from lmflow_ray.train.tasks import TASKS, job_kind

CHECKPOINT_TAG = "ds"
STATE_FILE = "trainer_state.json"


def _save_checkpoint(engine, state: dict, metrics: dict, rank: int):
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


def _save_model(engine, stage: int, rank: int, out: Path, tokenizer_path: str, probe: dict, kind: str = "causal"):
    """Save OUT/model (HF format) and verify it: reload with transformers, compare logits (or reward scores)
    on `probe` (model inputs, CPU tensors)."""
    engine.module.eval()
    dtype = next(engine.module.parameters()).dtype
    with torch.no_grad():
        # the probe holds CPU tensors (collated rows); the comparison runs on CPU
        on_device = {k: v.to(engine.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in probe.items()}
        ref = engine(**on_device).logits.float().cpu()
    state_dict = _gather_state_dict(engine, stage)
    if rank != 0:
        return None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = out / "model"
    engine.module.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(model_dir)
    if kind == "vlm":  # the image processor and the processor that expands <image> (models/vision.py)
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(tokenizer_path).save_pretrained(model_dir)
    if is_adapter(model_dir):
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel

        if kind == "vlm":
            from transformers import AutoModelForImageTextToText

            base = AutoModelForImageTextToText.from_pretrained(tokenizer_path, dtype=torch.float32)
            reloaded = PeftModel.from_pretrained(base, str(model_dir))
        elif kind == "reward":  # the base's own config has no one-score head: say so
            reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=ref.dtype, num_labels=1, pad_token_id=engine.module.config.pad_token_id)
        else:
            reloaded = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=ref.dtype)
    else:
        from transformers import AutoModelForImageTextToText

        cls = {"reward": AutoModelForSequenceClassification, "vlm": AutoModelForImageTextToText}.get(
            kind, AutoModelForCausalLM)
        reloaded = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(**{k: v.float() if v.is_floating_point() else v for k, v in probe.items()}).logits.float()
    torch.save({**probe, "logits": ref}, out / "save_check.pt")
    return float((got - ref).abs().max())


class Recipe:
    """One Ray Train worker's run, read top to bottom as torchtune's recipes read: `__init__` sets up
    (config, task, DeepSpeed engine, restored state, dataset shards), `train` runs the epochs (each
    optimizer step through step.py::optimizer_step; `_after_step` logs, evaluates and checkpoints),
    `save` writes OUT/model and the last checkpoint."""

    def __init__(self, args: dict):
        plan: Plan = args["plan"]
        self.plan = plan
        self.cfg = cfg = TASKS[plan.task].config_class.model_validate(args["config"])
        self.task = TASKS[plan.task](cfg, plan)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.out = Path(plan.output_dir)
        # The global batch is fixed; an elastic run that lost workers accumulates more micro-batches per step.
        self.gas = plan.global_batch // (cfg.train.micro_batch_size * self.world)
        ds_config = {**plan.ds_config, "gradient_accumulation_steps": self.gas, "train_batch_size": plan.global_batch}
        torch.manual_seed(cfg.seed)
        self.engine = build_engine(self.task, cfg, ds_config, plan.total_steps)
        self.task.setup(self.engine)
        self.state = _restore(self.engine, plan.resume_checkpoint, self.world, self.rank) \
            or {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0}
        self.state["job"] = job_kind(cfg)  # in every checkpoint: a resume by another job kind is refused
        # metrics.jsonl and the trackers `logging:` turns on, on rank 0
        self.log = MetricsLog(self.out, "step", self.state["step"], cfg.logging, args["config"], plan.task) \
            if self.rank == 0 else None
        if self.rank == 0 and self.state["step"]:
            print(f"[lmflow-ray] resumed at step {self.state['step']} (epoch {self.state['epoch']}) on {self.world} "
                  "worker(s)", flush=True)
        elif self.rank == 0:
            print(f"[lmflow-ray] training on {self.world} worker(s)", flush=True)
        self.lisa_layers = None
        if cfg.lisa.enabled:
            self._lisa()
        shards = args.get("shards")  # this worker's share, split on the driver; else Ray Train's streaming split
        self.shard = shards["train"][self.rank] if shards else ray.train.get_dataset_shard("train")
        self.eval_shard = None if not plan.has_eval else \
            shards["eval"][self.rank] if shards else ray.train.get_dataset_shard("eval")
        self.probe = None  # the first batch's rows: the save check compares logits on them
        self.t0, self.steps_timed = time.time(), 0
        self.window_tokens, self.window_start = 0.0, self.t0  # tokens/s over the steps since the last log line
        self.window_wait = 0.0  # seconds the loop waited for its micro-batches (data) since the last log line

    def _lisa(self) -> None:
        lisa = self.cfg.lisa
        self.lisa_layers = lisa_select(self.engine.module, lisa.active_layers, self.state["step"] // lisa.interval_steps,
                                       self.cfg.seed)

    def _batches(self, shard, batch_size: int):
        return shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                        collate_fn=lambda b: self.task.collate(b, self.plan.pad_id))

    def train(self) -> None:
        state, t, total = self.state, self.cfg.train, self.plan.total_steps
        done = state["step"] >= total
        if self.eval_shard is not None and state["step"] == 0 and not done:
            # The starting point of every eval curve (e.g. a reward model's ~50% accuracy before training).
            start = {"step": 0, "epoch": 0, **self.task.evaluate(self.engine, self.eval_shard, t.micro_batch_size,
                                                                  self.plan.pad_id)}
            if self.rank == 0:
                self.log.write({**start, "time": time.time()})
                print("[lmflow-ray] step 0 eval: " + " ".join(f"{k} {v:.4f}" for k, v in start.items()
                                                              if k.startswith("eval_")), flush=True)
        while not done and state["epoch"] < t.num_epochs:
            batches = iter(self._batches(self.shard, t.micro_batch_size))
            for _ in range(state["step_in_epoch"] * self.gas):
                next(batches)  # already trained on before the restart
            while state["step_in_epoch"] < self.plan.steps_per_epoch and not done:
                self.engine.module.train()
                fetch = time.perf_counter()
                micro = [next(batches) for _ in range(self.gas)]
                self.window_wait += time.perf_counter() - fetch
                if self.probe is None:
                    self.probe = self.task.probe(micro[0])
                result = optimizer_step(self.engine, self.task, micro, self.world)
                state["step"] += 1
                state["step_in_epoch"] += 1
                state["tokens"] += int(result.seen)
                state["padding_tokens"] = state.get("padding_tokens", 0) + int(result.padding)
                self.window_tokens += result.seen
                self.steps_timed += 1
                if self.cfg.lisa.enabled and state["step"] % self.cfg.lisa.interval_steps == 0:
                    self._lisa()
                done = state["step"] >= total
                self._after_step(result, done)
            if state["step_in_epoch"] >= self.plan.steps_per_epoch:
                state["epoch"] += 1
                state["step_in_epoch"] = 0

    def _after_step(self, result, done: bool) -> None:
        """Every `logging_steps` a metrics row and a progress line; evaluation and checkpoints when due."""
        state, t = self.state, self.cfg.train
        is_log = state["step"] % t.logging_steps == 0 or done
        is_save = bool(t.save_steps) and state["step"] % t.save_steps == 0 and not done
        is_eval = self.eval_shard is not None and (done or (t.eval_steps and state["step"] % t.eval_steps == 0))
        if not (is_log or is_save or is_eval):
            return
        elapsed = time.time() - self.t0
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "step": state["step"], "epoch": state["epoch"], "loss": result.loss,
            "lr": self.engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
            **self.task.report(result.stats, max(result.units, 1)),
            "tokens_per_s": self.window_tokens / max(time.time() - self.window_start, 1e-9),
            self.task.unit: int(result.units),
            "tokens_seen": state["tokens"], "padding_tokens_seen": state.get("padding_tokens", 0),
            "elapsed_s": elapsed, "data_wait_s": self.window_wait,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if self.lisa_layers is not None:
            metrics["lisa_layers"] = self.lisa_layers
        if is_eval:
            metrics.update(self.task.evaluate(self.engine, self.eval_shard, t.micro_batch_size, self.plan.pad_id))
        if self.rank == 0:
            total = self.plan.total_steps
            eta = (total - state["step"]) * elapsed / max(self.steps_timed, 1)
            self.log.write({**metrics, "time": time.time()})
            ev = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            print(f"[lmflow-ray] step {state['step']}/{total} loss {metrics['loss']:.4f}{ev} "
                  f"lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)
        if is_save:
            _save_checkpoint(self.engine, dict(state), metrics, self.rank)
        self.window_tokens, self.window_start, self.window_wait = 0.0, time.time(), 0.0

    def save(self) -> None:
        """OUT/model (checked by reloading it) and the final checkpoint."""
        if self.probe is None:  # resumed a finished run: nothing new to train on, probe any batch
            first = next(iter(self.shard.iter_torch_batches(
                batch_size=1, collate_fn=lambda b: self.task.collate(b, self.plan.pad_id))))
            self.probe = self.task.probe(first)
        diff = _save_model(self.engine, self.plan.zero_stage, self.rank, self.out, self.plan.tokenizer_path, self.probe,
                           self.task.model_kind)
        state = self.state
        final = {"step": state["step"], "epoch": state["epoch"], "final": True, "tokens_seen": state["tokens"]}
        if self.rank == 0:
            final["save_check_max_abs_diff"] = diff
        _save_checkpoint(self.engine, dict(state), final, self.rank)
        if self.log is not None:
            self.log.close()


def train_worker(args: dict) -> None:
    """The function Ray Train runs on every worker."""
    recipe = Recipe(args)
    recipe.train()
    recipe.save()
