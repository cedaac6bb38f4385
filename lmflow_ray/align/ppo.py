"""`lmflow-ray ppo`: on-policy RL from a reward (PPO, GRPO, REINFORCE++, RLOO) as a Ray actor graph.

Each iteration (actors in graph.py):
1. rollout: the GenerationActors sample `samples_per_prompt` responses for a batch of prompts;
2. experience: the RewardActor scores them; the ReferenceActor (frozen start policy) and a
   second ReferenceActor synced to the current policy give per-token log-probs (the
   sampling policy's log-probs are recomputed by a plain HF forward, as the trainer will
   compute them: in fp32 the first PPO step's ratio is 1, in bf16 within rounding; sampling at
   temperature 1 keeps them the sampling distribution); for `ppo` the CriticActor gives V;
3. advantages (advantages.py) with the KL penalty coefficient of the adaptive controller;
4. update: the rollout rows go to the finetuning loop with the PPO objective
   (train/tasks.py PPOTask: clipped surrogate + clipped value loss + GRPO's k3 KL term),
   `train.num_epochs` PPO epochs in mini-batches of the train batch size; Ray Train + DeepSpeed
   in OUT/iterations/NNN/train (policy in model/, critic in critic/);
5. sync: the new policy weights go into the running engines and the policy scorer, the
   critic's into the CriticActor.

metrics.jsonl gets one row per iteration: iteration, reward_mean, reward_max, reward_std,
kl (per sample, sampling policy vs reference), kl_coef, response_len, the update's pg_loss /
vf_loss / clipfrac / entropy / approx_kl, and gen_s / score_s / train_s / sync_s,
gen_tokens_per_s. OUT/model is the last policy, OUT/critic the last critic, reward.png the curve.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lmflow_ray.config import PPOConfig, PPOTrainConfig, load_config

UPDATE_METRICS = ("pg_loss", "vf_loss", "kl_loss", "clipfrac", "entropy", "approx_kl")


def init_critic(start: str, policy: str, out: Path, seed: int) -> str:
    """A token-classification critic saved to `out`: from a reward model (its score head becomes the
    value head) or a causal LM (value head zeroed, so every value starts at 0). Dropout off: the
    values of training and of the CriticActor must be the same function."""
    import torch

    from lmflow_ray.errors import UserError
    from lmflow_ray.models.loading import load_value_model
    from lmflow_ray.models.zoo import resolve_model

    path = resolve_model(start)
    if (path / "adapter_config.json").is_file():
        raise UserError(f"ppo.critic_model {start} is a LoRA adapter; merge it first (lmflow-ray merge-lora)")
    config = json.loads((path / "config.json").read_text())
    vocab = json.loads((resolve_model(policy) / "config.json").read_text()).get("vocab_size")
    if config.get("vocab_size") != vocab:
        raise UserError(f"ppo.critic_model {start} has vocab_size {config.get('vocab_size')}, the policy {vocab}: "
                        "the critic reads the policy's token ids; start it from a model with the same tokenizer")
    torch.manual_seed(seed)
    model = load_value_model(path)
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        torch.nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    model.config.pad_token_id = model.config.pad_token_id or model.config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def write_rollouts(path: Path, roll: dict, got: dict, adv: list, returns: list | None) -> None:
    with open(path, "w") as f:
        for i, (p, r) in enumerate(zip(roll["prompt_ids"], roll["response_ids"])):
            if not r:
                continue  # nothing sampled, nothing to learn
            row = {"input_ids": p + r, "prompt_len": len(p), "old_logp": got["old"][i], "ref_logp": got["ref"][i],
                   "adv": adv[i]}
            if returns is not None:
                row.update(ret=returns[i], old_value=got["values"][i])
            f.write(json.dumps(row) + "\n")


def run_ppo(cfg: PPOConfig) -> list[dict]:
    from lmflow_ray.align.advantages import AdaptiveKL, advantages
    from lmflow_ray.align.graph import Graph

    p, out = cfg.ppo, Path(cfg.output_dir)
    graph = Graph(cfg, out, policy_scorer=True)
    critic = None
    try:
        if p.uses_critic:
            critic = init_critic(p.critic_model or cfg.model, cfg.model, out / "critic_init", cfg.seed)
            graph.add_critic(critic)
        kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
        k = p.samples_per_prompt
        for it in range(1, p.iterations + 1):
            if it > 1 and graph.out_of_time(p.time_budget_s):
                print(f"[lmflow-ray] time budget of {p.time_budget_s:.0f}s spent after {it - 1} iterations", flush=True)
                break
            batch = graph.prompts(it, p.prompts_per_iteration)
            roll = graph.rollout(batch, k, p.seed + it)
            got = graph.score(roll, values=p.uses_critic)
            scores = got["scores"]
            kl_coef = kl_ctl.value
            adv, returns = advantages(p.estimator, scores, k, got["old"], got["ref"], got.get("values"), kl_coef,
                                      p.gamma, p.lam, p.whiten_advantages)
            kl = sum(sum(o) - sum(q) for o, q in zip(got["old"], got["ref"])) / len(scores)
            mean = sum(scores) / len(scores)
            row = {"iteration": it, "reward_mean": mean, "reward_max": max(scores),
                   "reward_std": (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5, "kl": kl,
                   "kl_coef": kl_coef, "response_len": roll["tokens"] / len(scores), "gen_s": roll["gen_s"],
                   "score_s": got["score_s"], "gen_tokens_per_s": roll["tokens"] / max(roll["gen_wall_s"], 1e-9)}
            it_dir = out / "iterations" / f"{it:03d}"
            it_dir.mkdir(parents=True)
            write_rollouts(it_dir / "rollouts.jsonl", roll, got, adv, returns)
            row.update(graph.update(it, PPOTrainConfig, it_dir / "rollouts.jsonl",
                                    {"ppo": {**p.model_dump(), "kl_coef": kl_coef}, "critic": critic}))
            final = _last_update_metrics(it_dir / "train" / "metrics.jsonl")
            row.update(final)
            if critic:
                critic = str(it_dir / "train" / "critic")
                graph.sync_critic(critic)
            kl_ctl.update(kl, len(scores))
            graph.record(row, f"[lmflow-ray] {p.estimator} iteration {it}/{p.iterations}: reward {mean:.4f} "
                              f"kl {kl:.3f} (coef {kl_coef:.3g}) pg_loss {final.get('pg_loss', float('nan')):.4f} "
                              f"gen {row['gen_s']:.1f}s score {row['score_s']:.1f}s train {row['train_s']:.1f}s")
    except BaseException:
        graph.close()  # actors and placement group go, whatever failed
        raise
    rows = graph.finish(p.estimator, {"reward_mean": "mean sample reward"})
    if critic:
        shutil.copytree(critic, out / "critic")
    return rows


def _last_update_metrics(path: Path) -> dict:
    """The update's mean losses over its optimizer steps (the loop logs them per step)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    rows = [r for r in rows if "pg_loss" in r]
    return {k: sum(r[k] for r in rows) / len(rows) for k in UPDATE_METRICS if rows and k in rows[0]}


def ppo_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(PPOConfig, config_path, overrides)
    run_ppo(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
