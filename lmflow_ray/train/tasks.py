"""What a training job optimises, plugged into the one worker loop (loop.py).

A task builds the model, collates micro-batches, and turns a micro-batch into a loss sum
plus metric sums over its normalisation units (learned tokens for SFT, pairs for reward
modeling and DPO). The loop does everything else (DeepSpeed, accumulation, global
normalisation, checkpoints, restarts, logging, saving): `finetune`, `reward-model` and
`dpo` share it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import ray.data
import torch

from lmflow_ray.config import DPOConfig, FinetuneConfig, RewardModelConfig
from lmflow_ray.data.collate import collate
from lmflow_ray.data.source import as_spec
from lmflow_ray.models.build import build_model, build_vlm
from lmflow_ray.models.loading import REWARD_FORMAT_FILE, load_causal_lm, load_value_model
from lmflow_ray.models.scoring import token_nll_sum
from lmflow_ray.models.zoo import resolve_model
from lmflow_ray.train.data import build_image_text_dataset, build_token_dataset, with_pixels
from lmflow_ray.train.objectives import (
    dpo_loss,
    k3_kl,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
)
from lmflow_ray.train.pairs import PAIR_TYPES, build_pair_dataset, collate_pairs
from lmflow_ray.train.step import all_sum


def _forward_inputs(mb: dict, device) -> dict:
    # use_cache=False: with a KV cache transformers skips packed-sequence masking.
    inputs = {"input_ids": mb["input_ids"]}
    if "position_ids" in mb:
        inputs["position_ids"] = mb["position_ids"]  # packed: boundaries come from position ids
    else:
        inputs["attention_mask"] = mb["attention_mask"]
    return {k: v.to(device) for k, v in inputs.items()}


class Task:
    """Next-token SFT / continued pretraining (`lmflow-ray finetune`; RAFT's policy update)."""

    config_class: type[FinetuneConfig] = FinetuneConfig  # the job's YAML schema
    unit = "learned_tokens"
    model_kind = "causal"  # how OUT/model reloads: causal LM or sequence-classification (reward) model

    def __init__(self, cfg, plan):
        self.cfg, self.plan = cfg, plan

    # ------------------------------------------------------------------ driver side (before / after Ray Train)

    @classmethod
    def datasets(cls, cfg, model_path: str, pad_id: int, bf16: bool) -> tuple:
        """(train Ray Dataset, eval Dataset or None, info, plan extras) of the job's data file."""
        d = cfg.data
        ds, eval_ds, info = build_token_dataset(as_spec(d), d.type, model_path, d.template, d.max_length, d.packing,
                                                cfg.seed, d.eval_split)
        return ds, eval_ds, info, {}

    @classmethod
    def streamed(cls, ds, info: dict):
        """The dataset with what is computed as its rows stream to the workers, after the driver made the
        rows durable (elastic runs write them to storage; this part is never written)."""
        return ds

    @classmethod
    def finish(cls, cfg, model_dir: Path, info: dict, pad_id: int) -> None:
        """What the job adds to OUT/model after training."""

    # ------------------------------------------------------------------ worker side

    def build_model(self):
        return build_model(self.cfg, self.plan)

    def param_groups(self, model) -> list:
        """What the optimizer updates (torch param groups; a group may carry its own lr)."""
        return [p for p in model.parameters() if p.requires_grad]

    def setup(self, engine) -> None:
        """Called once the DeepSpeed engine exists (e.g. to load a reference model)."""

    def collate(self, batch, pad_id: int) -> dict:
        return collate(batch, pad_id)

    def units(self, mb) -> float:
        return float((mb["labels"][:, 1:] != -100).sum())

    def loss(self, engine, mb) -> tuple:
        """(loss summed over this micro-batch's units, {metric: sum over units})."""
        logits = engine(**_forward_inputs(mb, engine.device), use_cache=False).logits
        nll, _ = token_nll_sum(logits, mb["labels"].to(engine.device))
        return nll, {}

    def report(self, sums: dict, units: float) -> dict:
        return {}

    def probe(self, mb: dict) -> dict:
        """Inputs from a training micro-batch on which the saved model's outputs are checked."""
        return {"input_ids": mb["input_ids"][:2, :64].clone()}

    def evaluate(self, engine, shard, micro_batch_size: int, pad_id: int) -> dict:
        """Held-out metrics over all workers: loss (and the task's metrics) per unit, prefixed eval_."""
        engine.module.eval()
        loss, units, sums = 0.0, 0.0, {}
        with torch.no_grad():
            for mb in shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=lambda b: self.collate(b, pad_id)):
                value, stats = self.loss(engine, mb)
                loss, units = loss + float(value), units + self.units(mb)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        totals = all_sum([loss, units, *(sums[k] for k in keys)])
        engine.module.train()
        loss, units = totals[0], max(totals[1], 1.0)
        out = {"eval_loss": loss / units, **{f"eval_{k}": v for k, v in self.report(dict(zip(keys, totals[2:])), units).items()}}
        if self.unit == "learned_tokens":
            out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        return out


class VisionTask(Task):
    """Vision-language SFT: `lmflow-ray finetune` on image_text data with a LLaVA model (models/vision.py).

    Rows carry their images as pixels (decoded in Ray Data, train/data.py::with_pixels); the loss is
    SFT's, over the assistant tokens (image positions and user turns are not learned). Which parts
    learn is `vlm.trainable` (stage 1: the projector; stage 2: projector + language model)."""

    model_kind = "vlm"

    @classmethod
    def datasets(cls, cfg, model_path: str, pad_id: int, bf16: bool) -> tuple:
        d = cfg.data
        ds, eval_ds, info = build_image_text_dataset(as_spec(d), model_path, d.template, d.max_length, cfg.seed,
                                                     d.eval_split)
        return ds, eval_ds, info, {}

    @classmethod
    def streamed(cls, ds, info: dict):
        return with_pixels(ds, info["image_processor"])  # decoded as rows stream; only paths are stored

    def build_model(self):
        return build_vlm(self.cfg, self.plan)

    def collate(self, batch, pad_id: int) -> dict:
        out = collate(batch, pad_id)
        images = [np.asarray(x, dtype=np.float32) for x in batch["pixel_values"]]
        out["pixel_values"] = torch.from_numpy(np.concatenate(images))
        out["image_counts"] = torch.tensor([len(x) for x in images])
        return out

    @staticmethod
    def _inputs(engine, mb: dict) -> dict:
        dtype = next(engine.module.parameters()).dtype
        return {"input_ids": mb["input_ids"].to(engine.device), "attention_mask": mb["attention_mask"].to(engine.device),
                "pixel_values": mb["pixel_values"].to(engine.device, dtype=dtype)}

    def loss(self, engine, mb) -> tuple:
        logits = engine(**self._inputs(engine, mb), use_cache=False).logits
        nll, _ = token_nll_sum(logits, mb["labels"].to(engine.device))
        return nll, {}

    def probe(self, mb: dict) -> dict:
        """The first row whole (a cut could fall inside its image positions) with its images."""
        n = int(mb["image_counts"][0])
        width = int(mb["attention_mask"][0].sum())
        return {"input_ids": mb["input_ids"][:1, :width].clone(), "pixel_values": mb["pixel_values"][:n].clone()}


class PairTask(Task):
    unit = "pairs"
    data_types = PAIR_TYPES  # LMFlow dataset types the job accepts

    @classmethod
    def datasets(cls, cfg, model_path: str, pad_id: int, bf16: bool) -> tuple:
        d = cfg.data
        ds, eval_ds, info = build_pair_dataset(as_spec(d), d.type, model_path, d.template, d.max_length, cfg.seed,
                                               d.eval_split, cls.data_types)
        skipped = {k: v for k, v in info["skipped"].items() if v}
        if skipped:
            print(f"[lmflow-ray] skipped pairs: {skipped} (identical sides, empty responses, or cut by data.max_length)",
                  flush=True)
        return ds, eval_ds, info, {}

    def collate(self, batch, pad_id: int) -> dict:
        return collate_pairs(batch, pad_id)

    def units(self, mb) -> float:
        return float(len(mb["margin"]))


class RewardTask(PairTask):
    """Reward model: a sequence-classification head (one score) on the causal LM backbone.

    The score of a sequence is the head's value at its last non-pad token (transformers'
    sequence-classification pooling); the loss is Bradley-Terry (objectives.pairwise_reward_loss).
    """

    config_class = RewardModelConfig
    model_kind = "reward"

    @classmethod
    def finish(cls, cfg, model_dir: Path, info: dict, pad_id: int) -> None:
        """How pairs were formatted in training: RewardScorer formats (prompt, response) the same way."""
        d = cfg.data
        fmt = {"format": "conversation" if info["type"] == "paired_conversation" else "text2text",
               "template": d.template, "max_length": d.max_length, "pad_token_id": pad_id}
        (model_dir / REWARD_FORMAT_FILE).write_text(json.dumps(fmt) + "\n")

    def build_model(self):
        return build_model(self.cfg, self.plan, head="reward")

    def loss(self, engine, mb):
        scores = engine(**_forward_inputs(mb, engine.device)).logits.squeeze(-1).float()
        b = len(mb["margin"])
        chosen, rejected = scores[:b], scores[b:]
        loss = pairwise_reward_loss(chosen, rejected, mb["margin"].to(engine.device))
        gap = (chosen - rejected).detach()
        return loss, {"correct": float((gap > 0).sum()), "margin": float(gap.sum())}

    def report(self, sums: dict, units: float) -> dict:
        return {"accuracy": sums.get("correct", 0.0) / units, "mean_margin": sums.get("margin", 0.0) / units}


class DPOTask(PairTask):
    """DPO on the policy, against a frozen reference (objectives.dpo_loss).

    Reference log-probs come from, in order: columns precomputed in one Ray Data pass
    (`dpo.reference: precompute`), the policy with its LoRA adapters disabled (LoRA runs: no
    second copy), or a frozen copy of the starting model on each worker (`copy`).
    """

    config_class = DPOConfig
    data_types = ("paired_conversation", "paired_text_to_text")

    @classmethod
    def datasets(cls, cfg, model_path: str, pad_id: int, bf16: bool) -> tuple:
        ds, eval_ds, info, _ = super().datasets(cfg, model_path, pad_id, bf16)
        ref_model_path = str(resolve_model(cfg.dpo.ref_model)) if cfg.dpo.ref_model else model_path
        if cfg.dpo.reference == "precompute" and not cfg.lora.enabled:
            print("[lmflow-ray] precomputing reference log-probs (one Ray Data pass)", flush=True)
            ds = precompute_reference(ds, ref_model_path, pad_id, bf16, cfg.scaling.use_gpu)
            if eval_ds is not None:
                eval_ds = precompute_reference(eval_ds, ref_model_path, pad_id, bf16, cfg.scaling.use_gpu)
        return ds, eval_ds, info, {"ref_model_path": ref_model_path}

    def setup(self, engine) -> None:
        d = self.cfg.dpo
        self.ref = None
        if d.reference == "copy" and not self.cfg.lora.enabled:
            dtype = torch.bfloat16 if self.plan.bf16 else torch.float32
            self.ref = load_causal_lm(self.plan.ref_model_path, dtype=dtype).to(engine.device).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)

    def _ref_logps(self, engine, mb):
        if "ref_logp" in mb:
            return mb["ref_logp"].to(engine.device), mb["ref_count"].to(engine.device)
        inputs = _forward_inputs(mb, engine.device)
        labels = mb["labels"].to(engine.device)
        with torch.no_grad():
            if self.ref is not None:
                return sequence_logps(self.ref(**inputs, use_cache=False).logits, labels)
            with engine.module.disable_adapter():
                return sequence_logps(engine(**inputs, use_cache=False).logits, labels)

    def loss(self, engine, mb):
        d = self.cfg.dpo
        b = len(mb["margin"])
        logits = engine(**_forward_inputs(mb, engine.device), use_cache=False).logits
        pi, count = sequence_logps(logits, mb["labels"].to(engine.device))
        ref, ref_count = self._ref_logps(engine, mb)
        if d.loss == "ipo":  # IPO compares per-token mean log-probs
            pi, ref = pi / count.clamp(min=1), ref / ref_count.clamp(min=1)
        losses, r_chosen, r_rejected = dpo_loss(pi[:b], pi[b:], ref[:b], ref[b:], d.beta, d.loss, d.label_smoothing)
        log_ratio = (pi - ref).detach()
        stats = {
            "correct": float((r_chosen > r_rejected).sum()),
            "chosen_reward": float(r_chosen.sum()), "rejected_reward": float(r_rejected.sum()),
            "kl": float((log_ratio[:b] + log_ratio[b:]).sum() / 2),
            "logp_margin": float((pi[:b] - pi[b:]).detach().sum()),
        }
        return losses.sum(), stats

    def report(self, sums: dict, units: float) -> dict:
        chosen, rejected = sums.get("chosen_reward", 0.0) / units, sums.get("rejected_reward", 0.0) / units
        return {"reward_accuracy": sums.get("correct", 0.0) / units, "chosen_reward": chosen,
                "rejected_reward": rejected, "reward_margin": chosen - rejected, "kl": sums.get("kl", 0.0) / units,
                "logp_margin": sums.get("logp_margin", 0.0) / units}


class _ReferenceScorer:
    """Ray Data actor: sequence log-probs of both sides of each pair under the frozen reference model."""

    def __init__(self, model_path: str, pad_id: int, bf16: bool):
        self.pad_id = pad_id
        self.model = load_causal_lm(model_path, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
        if torch.cuda.is_available():
            self.model = self.model.cuda()

    def __call__(self, batch: dict) -> dict:
        mb = collate_pairs(batch, self.pad_id)
        dev = self.model.device
        with torch.no_grad():
            logits = self.model(input_ids=mb["input_ids"].to(dev), attention_mask=mb["attention_mask"].to(dev),
                                use_cache=False).logits
            logp, count = sequence_logps(logits, mb["labels"].to(dev))
        n = len(batch["margin"])
        batch["ref_logp"] = np.stack([logp[:n].cpu().numpy(), logp[n:].cpu().numpy()], axis=1)
        batch["ref_count"] = np.stack([count[:n].cpu().numpy(), count[n:].cpu().numpy()], axis=1).astype(np.float32)
        return batch


def precompute_reference(ds, model_path: str, pad_id: int, bf16: bool, use_gpu: bool, batch_size: int = 8):
    """One pass over the pairs with the reference model (a Ray Data actor), stored as columns."""
    return ds.map_batches(_ReferenceScorer, fn_constructor_kwargs={"model_path": model_path, "pad_id": pad_id,
                                                                   "bf16": bf16},
                          batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                          num_gpus=1 if use_gpu else 0, num_cpus=1).materialize()


ROLLOUT_COLUMNS = ("old_logp", "ref_logp", "adv", "ret", "old_value")


def collate_rollouts(batch: dict, pad_id: int) -> dict:
    """Rollout rows → right-padded (B, L) ids/mask, and per-token columns on the (B, L - 1) shifted grid.

    A row holds `input_ids` (prompt + response), `prompt_len` and one value per response token in
    each of ROLLOUT_COLUMNS (missing ones stay 0). Response token j sits at input position
    prompt_len + j and is predicted at shifted position prompt_len + j - 1, where its values go.
    """
    import torch

    ids = list(batch["input_ids"])
    b, length = len(ids), max(len(x) for x in ids)
    out = {"input_ids": torch.full((b, length), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((b, length), dtype=torch.long),
           "mask": torch.zeros((b, length - 1), dtype=torch.bool)}
    cols = {c: torch.zeros((b, length - 1)) for c in ROLLOUT_COLUMNS}
    for i, x in enumerate(ids):
        n, p = len(x), int(batch["prompt_len"][i])
        out["input_ids"][i, :n] = torch.as_tensor(list(x))
        out["attention_mask"][i, :n] = 1
        out["mask"][i, p - 1:n - 1] = True
        for c in ROLLOUT_COLUMNS:
            if c in batch and batch[c][i] is not None:
                cols[c][i, p - 1:n - 1] = torch.as_tensor(list(batch[c][i]), dtype=torch.float32)
    return {**out, **cols}


class PolicyGradientTask(Task):
    """Policy-gradient update on a rollout batch of the PPO family (align/ppo.py makes the rollouts).

    Loss per response token: the clipped surrogate (objectives.ppo_policy_loss) on the advantages,
    plus kl_coef x k3 KL to the reference for `grpo`; normalised over the response tokens of the
    global batch, like SFT. `plan.ppo` holds the PPO settings (its kl_coef the current one).
    """

    unit = "response_tokens"

    def collate(self, batch, pad_id: int) -> dict:
        return collate_rollouts(batch, pad_id)

    def units(self, mb) -> float:
        return float(mb["mask"].sum())

    def loss(self, engine, mb):
        p = self.plan.ppo
        dev = engine.device
        ids, mask = mb["input_ids"].to(dev), mb["mask"].to(dev)
        col = {c: mb[c].to(dev) for c in ROLLOUT_COLUMNS}
        out = engine(input_ids=ids, attention_mask=mb["attention_mask"].to(dev), use_cache=False)
        logprobs = out.logits[:, :-1].float().log_softmax(-1)
        logp = torch.gather(logprobs, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss, clipped = ppo_policy_loss(logp, col["old_logp"], col["adv"], mask, p["clip_range"])
        stats = {"pg_loss": float(loss.detach()), "clipped": clipped}
        with torch.no_grad():
            stats["entropy"] = float((-(logprobs.exp() * logprobs).sum(-1) * mask).sum())
            stats["approx_kl"] = float((0.5 * (logp - col["old_logp"]) ** 2 * mask).sum())
            stats["kl_ref"] = float(((logp - col["ref_logp"]) * mask).sum())
        if p["estimator"] == "grpo" and p["kl_coef"]:
            kl = k3_kl(logp, col["ref_logp"], mask)
            stats["kl_loss"] = float(kl.detach())
            loss = loss + p["kl_coef"] * kl
        return loss, stats

    def report(self, sums: dict, units: float) -> dict:
        return {k if k != "clipped" else "clipfrac": v / units for k, v in sums.items()}


class ValueTask(PolicyGradientTask):
    """PPO's critic as its own trainer (own optimizer, learning rate and clipping): a one-label
    token-classification model regressed on the GAE returns with the clipped value loss."""

    def build_model(self):
        model = load_value_model(self.plan.model_path, torch.bfloat16 if self.plan.bf16 else torch.float32)
        if self.plan.critic_from_lm:  # a new value head: every value starts at 0
            torch.nn.init.zeros_(model.score.weight)
            if getattr(model.score, "bias", None) is not None:
                torch.nn.init.zeros_(model.score.bias)
        model.config.pad_token_id = model.config.pad_token_id or self.plan.pad_id
        return model

    def loss(self, engine, mb):
        p = self.plan.ppo
        dev = engine.device
        mask = mb["mask"].to(dev)
        values = engine(input_ids=mb["input_ids"].to(dev), attention_mask=mb["attention_mask"].to(dev)).logits
        vf = ppo_value_loss(values.squeeze(-1).float()[:, :-1], mb["old_value"].to(dev), mb["ret"].to(dev), mask,
                            p["value_clip"])
        return p["vf_coef"] * vf, {"vf_loss": float(vf.detach())}

    def report(self, sums: dict, units: float) -> dict:
        return {"vf_loss": sums.get("vf_loss", 0.0) / units}


# The one registry of training objectives. The first three are job kinds a user runs
# (`lmflow-ray finetune | reward-model | dpo`, each with its config class); the RL trainer groups
# (align/trainer.py) run "finetune" (RAFT), "policy-gradient" and "value" (the PPO family) and
# "dpo" (iterative DPO); `lmflow-ray finetune` on image_text data runs "vision-finetune".
TASKS = {"finetune": Task, "reward-model": RewardTask, "dpo": DPOTask, "policy-gradient": PolicyGradientTask,
         "value": ValueTask, "vision-finetune": VisionTask}
JOB_KINDS = ("finetune", "reward-model", "dpo")


def job_kind(cfg) -> str:
    """The job kind whose config class `cfg` is."""
    return next(k for k in JOB_KINDS if type(cfg) is TASKS[k].config_class)
