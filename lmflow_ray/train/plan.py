"""What the driver resolved for the training processes (`Plan`): paths, the filled DeepSpeed
config, dtypes, sizes and counts. The driver builds it once (train/run.py for finetune /
reward-model / dpo, align/trainer.py::trainer_setup for the RL trainer groups) and every
worker reads it; the job's own settings stay in its validated config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class Plan:
    task: str  # a key of train/tasks.py::TASKS
    model_path: str  # resolved base model directory
    tokenizer_path: str
    ds_config: dict  # DeepSpeed config, "auto" fields filled (train/deepspeed_config.py)
    bf16: bool
    pad_id: int
    total_steps: int  # optimizer steps over the whole run (the LR schedule spans them)
    accumulation: int  # micro-batches per optimizer step and worker
    # finetune / reward-model / dpo (Ray Train workers)
    output_dir: str = ""
    steps_per_epoch: int = 0
    global_batch: int = 0  # rows per optimizer step over all workers (kept when an elastic run shrinks)
    resume_checkpoint: str | None = None
    has_eval: bool = False
    ref_model_path: str | None = None  # DPO's frozen reference
    # RL trainer groups
    use_gpu: bool = False
    threads: int | None = None  # torch threads per trainer rank
    ppo: dict = field(default_factory=dict)  # the PPO family's settings (clip range, KL coefficient, ...)
    critic_from_lm: bool = False  # the critic starts from a causal LM: a new value head

    @property
    def zero_stage(self) -> int:
        return self.ds_config["zero_optimization"].get("stage", 0)

    def but(self, **changes) -> Plan:
        """A copy with `changes`."""
        return replace(self, **changes)
