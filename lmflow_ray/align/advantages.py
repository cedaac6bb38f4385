"""Advantage estimators and the KL controller of `lmflow-ray ppo` (pure torch, per sample).

A rollout sample is one response of T tokens. Per token t the policy's log-prob `old_t`
(at sampling time) and the reference's `ref_t` give the k1 KL estimate `old_t - ref_t`.

- `ppo` (Ouyang et al. 2022 / Ziegler et al. 2019): token rewards
  r_t = -kl_coef * (old_t - ref_t), plus the sequence score on the last token;
  GAE with the critic's values: delta_t = r_t + gamma * V_{t+1} - V_t (V_T = 0),
  A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t (the critic's target).
  Advantages are whitened over the batch.
- `reinforce++` (Hu 2025): the same token rewards, no critic: A_t = sum_{s>=t} gamma^(s-t) r_s,
  whitened over the whole batch (the global baseline replaces the critic).
- `rloo` (Ahmadian et al. 2024): K samples per prompt; sequence reward
  R_i = score_i - kl_coef * sum_t KL_i,t, baseline = mean of the other K-1 samples' R;
  A_i,t = R_i - baseline for every token of sample i.
- `grpo` (Shao et al. 2024): A_i,t = (score_i - mean_group) / (std_group + eps); the KL to the
  reference is a loss term (k3 estimator, objectives.k3_kl), not a reward.
"""

from __future__ import annotations

import math

ESTIMATORS = ("ppo", "grpo", "reinforce++", "rloo")


def token_rewards(score: float, old: list[float], ref: list[float], kl_coef: float) -> list[float]:
    r = [-kl_coef * (o - q) for o, q in zip(old, ref)]
    if r:
        r[-1] += score
    return r


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """(advantages, returns) of one sequence; the value after its last token is 0 (episode ends)."""
    adv = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def whiten(seqs: list[list[float]], eps: float = 1e-8) -> list[list[float]]:
    """(x - mean) / std over every token of every sequence."""
    flat = [x for s in seqs for x in s]
    if len(flat) < 2:
        return [list(s) for s in seqs]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    return [[(x - mean) / (std + eps) for x in s] for s in seqs]


def group_advantages(scores: list[list[float]], kind: str, eps: float = 1e-6) -> list[list[float]]:
    """One advantage per sample, from its group of K samples of the same prompt (grpo or rloo)."""
    out = []
    for g in scores:
        k = len(g)
        if k < 2:
            raise ValueError(f"{kind} needs at least 2 samples per prompt")
        mean = sum(g) / k
        if kind == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in g) / (k - 1))
            out.append([(x - mean) / (std + eps) for x in g])
        elif kind == "rloo":
            total = sum(g)
            out.append([x - (total - x) / (k - 1) for x in g])
        else:
            raise ValueError(f"unknown group estimator {kind!r}")
    return out


class AdaptiveKL:
    """kl_coef follows a target KL (Ziegler et al. 2019): coef *= 1 + clip(kl/target - 1, ±0.2) * n/horizon.

    With `target` None the coefficient stays fixed.
    """

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


def advantages(estimator: str, scores: list[float], k: int, old: list[list[float]], ref: list[list[float]],
               values: list[list[float]] | None, kl_coef: float, gamma: float, lam: float,
               whiten_advantages: bool = True) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per-token (advantages, returns) of every sample; samples come prompt-major, `k` per prompt.

    `old` / `ref` / `values` hold each sample's per-token policy log-probs, reference log-probs and
    critic values. Returns (the critic's target) exist only for `ppo`.
    """
    if estimator in ("grpo", "rloo"):
        seq = list(scores)
        if estimator == "rloo":  # the KL penalty is part of the sequence reward
            seq = [s - kl_coef * sum(o - q for o, q in zip(old[i], ref[i])) for i, s in enumerate(scores)]
        groups = group_advantages([seq[i:i + k] for i in range(0, len(seq), k)], estimator)
        return [[a] * len(o) for a, o in zip((a for g in groups for a in g), old)], None
    rewards = [token_rewards(s, o, q, kl_coef) for s, o, q in zip(scores, old, ref)]
    if estimator == "reinforce++":
        return whiten([returns_to_go(r, gamma) for r in rewards]), None
    if estimator != "ppo":
        raise ValueError(f"unknown estimator {estimator!r}; one of {', '.join(ESTIMATORS)}")
    pairs = [gae(r, v, gamma, lam) for r, v in zip(rewards, values)]
    adv = [a for a, _ in pairs]
    return (whiten(adv) if whiten_advantages else adv), [ret for _, ret in pairs]
