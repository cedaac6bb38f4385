"""`lmflow-ray ppo`: on-policy RL from a reward (PPO, GRPO, REINFORCE++, RLOO) as a Ray actor graph.

Each iteration (actors in graph.py, trainers in trainer.py):
1. rollout: the GenerationActors sample `samples_per_prompt` responses for a batch of prompts;
2. experience: the RewardActor scores them (minus `missing_eos_penalty` for a response cut at
   max_tokens); the ReferenceActor (frozen start policy) gives per-token log-probs; the policy's
   trainer group gives the sampling policy's per-token log-probs, computed by the same engine
   and function the loss uses (in fp32 the first PPO step's ratio is exactly 1); for `ppo` the
   critic's trainer group gives V;
3. advantages (advantages.py) with the KL penalty coefficient of the adaptive controller;
4. update: the policy group trains the clipped surrogate (+ GRPO's k3 KL term) and, for `ppo`,
   the critic group (its own optimizer, `critic_lr` and `critic_max_grad_norm`) the clipped value
   loss, at the same time, `train.num_epochs` PPO epochs in mini-batches of the train batch size;
   both keep their optimizer state and LR schedule for the whole run;
5. sync: the new policy weights go through Ray's object store into the running engines.

Sampling must be at temperature 1 and top_p 1 (the config refuses others): the log-probs above
are of the untempered, untruncated policy, so the importance ratio and the KL would otherwise be
of a different distribution than the one sampled.

metrics.jsonl gets one row per iteration: iteration, reward_mean, reward_max, reward_std,
kl (per sample, sampling policy vs reference), kl_coef, response_len, truncated (share without
an end-of-sequence token), value_mean (critic), the update's pg_loss / vf_loss / clipfrac /
entropy / approx_kl / rows_unused, and gen_s / score_s / train_s / sync_s / sync_bytes,
gen_tokens_per_s. OUT/model is the last policy, OUT/critic the last critic, reward.png the curve.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lmflow_ray.config import PPOConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.models.zoo import is_adapter

UPDATE_METRICS = ("pg_loss", "vf_loss", "kl_loss", "clipfrac", "entropy", "approx_kl")


def check_critic(start: str, policy: str) -> tuple[str, bool]:
    """(critic start dir, whether it is a causal LM whose new value head starts at zero), checked.

    From a reward model its score head becomes the value head; from a causal LM the value head is
    zeroed, so every value starts at 0 (trainer-side, tasks.ValueTask).
    """
    from lmflow_ray.errors import UserError
    from lmflow_ray.models.zoo import resolve_model

    path = resolve_model(start)
    if is_adapter(path):
        raise UserError(f"ppo.critic_model {start} is a LoRA adapter; merge it first (lmflow-ray merge-lora)")
    config = json.loads((path / "config.json").read_text())
    vocab = json.loads((resolve_model(policy) / "config.json").read_text()).get("vocab_size")
    if config.get("vocab_size") != vocab:
        raise UserError(f"ppo.critic_model {start} has vocab_size {config.get('vocab_size')}, the policy {vocab}: "
                        "the critic reads the policy's token ids; start it from a model with the same tokenizer")
    from_lm = not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    return str(path), from_lm


def rollout_rows(roll: dict, got: dict, adv: list, returns: list | None) -> list[dict]:
    """Training rows: prompt + response ids and, per response token, old/ref log-probs, advantage (and
    the critic's return target and old value). Empty responses have nothing to learn and are left out."""
    rows = []
    for i, (p, r) in enumerate(zip(roll["prompt_ids"], roll["response_ids"])):
        if not r:
            continue
        row = {"input_ids": p + r, "prompt_len": len(p), "old_logp": got["old"][i], "ref_logp": got["ref"][i],
               "adv": adv[i]}
        if returns is not None:
            row.update(ret=returns[i], old_value=got["values"][i])
        rows.append(row)
    return rows


def penalise_truncated(scores: list[float], finished: list[bool], penalty: float | None) -> list[float]:
    """Scores minus `penalty` for every response that hit max_tokens without an end-of-sequence token."""
    if not penalty:
        return list(scores)
    return [s if done else s - penalty for s, done in zip(scores, finished)]


def run_ppo(cfg: PPOConfig) -> list[dict]:
    from lmflow_ray.align.advantages import AdaptiveKL, advantages
    from lmflow_ray.align.graph import Graph
    from lmflow_ray.align.trainer import trainer_setup

    p, out = cfg.ppo, Path(cfg.output_dir)
    k = p.samples_per_prompt
    per_step = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.scaling.num_workers
    total = p.iterations * cfg.train.num_epochs * max(1, p.prompts_per_iteration * k // per_step)
    settings = p.model_dump()
    critic_setup = None
    if p.uses_critic:  # checked before any actor starts
        start, from_lm = check_critic(p.critic_model or cfg.model, cfg.model)
        train = {**cfg.train.model_dump(), "lr": p.critic_lr or cfg.train.lr,
                 "max_grad_norm": cfg.train.max_grad_norm if p.critic_max_grad_norm is None else p.critic_max_grad_norm}
        critic_cfg, critic_plan = trainer_setup(cfg, start, total, "value", settings, train=train,
                                                lora={"enabled": False})
        critic_plan = critic_plan.but(critic_from_lm=from_lm, tokenizer_path=str(_policy_dir(cfg)))
        critic_setup = (critic_cfg, critic_plan)
    # No LoRA dropout: the old log-probs (eval mode) and the first step's (train mode) must agree (ratio 1).
    graph = Graph(cfg, out, "policy-gradient", total, settings, {"lora": {**cfg.lora.model_dump(), "dropout": 0.0}})
    with graph.running():
        if critic_setup:
            graph.add_trainer("critic", "value", *critic_setup)
        kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
        first, extra = graph.restore()
        kl_ctl.value = extra.get("kl_coef", kl_ctl.value)
        for it in graph.iterations(first, p.iterations, p.time_budget_s):
            batch = graph.prompts(it, p.prompts_per_iteration)
            roll = graph.rollout(batch, k, p.seed + it)
            got = graph.score(roll, policy_logps=True)
            raw = got["scores"]
            scores = penalise_truncated(raw, roll["finished"], p.missing_eos_penalty)
            kl_coef = kl_ctl.value
            adv, returns = advantages(p.estimator, scores, k, got["old"], got["ref"], got.get("values"), kl_coef,
                                      p.gamma, p.lam, p.whiten_advantages)
            kl = sum(sum(o) - sum(q) for o, q in zip(got["old"], got["ref"])) / len(raw)
            mean = sum(raw) / len(raw)
            row = {"iteration": it, "reward_mean": mean, "reward_max": max(raw),
                   "reward_std": (sum((s - mean) ** 2 for s in raw) / len(raw)) ** 0.5, "kl": kl,
                   "kl_coef": kl_coef, "response_len": roll["tokens"] / len(raw),
                   "truncated": sum(not f for f in roll["finished"]) / len(raw), "gen_s": roll["gen_s"],
                   "score_s": got["score_s"], "gen_tokens_per_s": roll["tokens"] / max(roll["gen_wall_s"], 1e-9)}
            if "values" in got:
                flat = [v for vs in got["values"] for v in vs]
                row["value_mean"] = sum(flat) / max(len(flat), 1)
            row.update(graph.update(rollout_rows(roll, got, adv, returns), cfg.train.num_epochs, cfg.seed + it,
                                    {"kl_coef": kl_coef}))
            kl_ctl.update(kl, len(raw))
            graph.record(row, f"[lmflow-ray] {p.estimator} iteration {it}/{p.iterations}: reward {mean:.4f} "
                              f"kl {kl:.3f} (coef {kl_coef:.3g}) pg_loss {row.get('pg_loss', float('nan')):.4f} "
                              f"gen {row['gen_s']:.1f}s score {row['score_s']:.1f}s train {row['train_s']:.1f}s "
                              f"sync {row['sync_s']:.1f}s")
            graph.checkpoint(it, {"kl_coef": kl_ctl.value})
    return graph.finish(p.estimator, {"reward_mean": "mean sample reward"})


def _policy_dir(cfg) -> Path:
    from lmflow_ray.models.zoo import resolve_model

    return resolve_model(cfg.model)


def ppo_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(PPOConfig, config_path, overrides)
    run_ppo(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
