"""Training objectives as small functions with their equations.

Loss normalisation: a global batch is spread over W workers x G accumulation micro-batches.
The loss we optimise is the mean over every learned token of the global batch,

    L = (1 / N) * sum_{all learned tokens t} -log p(y_t | y_<t),   N = learned tokens in the global batch,

not the mean of per-micro-batch means (which over-weights short samples). Each micro-batch
contributes its token sum divided by the global N; see `micro_batch_loss_scale`.
"""

from __future__ import annotations

from lmflow_ray.models.scoring import token_logps


def micro_batch_loss_scale(world_size: int, accumulation_steps: int, global_tokens: int) -> float:
    """Factor turning a micro-batch token sum into what DeepSpeed's backward expects.

    DeepSpeed divides each backward's loss by the accumulation steps and averages gradients
    over the data-parallel ranks; multiplying by W*G/N first leaves exactly sum/N = L.
    """
    return world_size * accumulation_steps / max(global_tokens, 1)


# ----------------------------------------------------------------------------- preferences
# Pair losses are normalised like tokens above, with pairs as the unit: the optimised loss
# is the mean over every pair of the global batch (micro_batch_loss_scale with N = pairs).


def pairwise_reward_loss(r_chosen, r_rejected, margin=None):
    """Bradley-Terry reward-model loss, summed over pairs (Ouyang et al. 2022; Llama-2's margin):

        loss = sum_i -log sigmoid(r_chosen_i - r_rejected_i - margin_i)

    `margin` (>= 0, default 0) asks for a larger gap on pairs rated far apart.
    """
    import torch.nn.functional as F

    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).sum()


def sequence_logps(logits, labels):
    """(sum of log p over each row's learned tokens, learned-token count per row), shape (rows,)."""
    picked, mask = token_logps(logits, labels)
    return picked.sum(-1), mask.sum(-1)


LOG_RATIO_CLAMP = 20.0  # PPO's log(pi / pi_old) per token
K3_CLAMP = 10.0  # k3's log(ref / pi) per token


def ppo_policy_loss(logp, old_logp, adv, mask, clip: float):
    """Clipped surrogate (Schulman et al. 2017), summed over masked tokens; and the clipped-token count.

    ratio = exp(logp - old_logp); loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps)).
    """
    import torch

    # Masked before exp (padding may hold anything), clamped as veRL does: exp(±20) stays finite.
    log_ratio = (logp - old_logp).masked_fill(~mask.bool(), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return (loss * mask).sum(), float(((clipped > unclipped) & mask).sum())


def ppo_value_loss(values, old_values, returns, mask, clip: float | None):
    """0.5 * max((V - R)^2, (V_clipped - R)^2) summed over masked tokens; V_clipped stays within clip of V_old."""
    import torch

    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return 0.5 * (loss * mask).sum()


def k3_kl(logp, ref_logp, mask):
    """Schulman's k3 estimate of KL(pi || ref), summed over masked tokens: exp(d) - d - 1 with d = ref - logp.

    Non-negative and unbiased; GRPO's KL loss term. The log-ratio is masked before exp (a padding
    position's exp could be inf, and inf * 0 = NaN) and clamped to ±K3_CLAMP, as OpenRLHF and veRL do:
    a token the policy gives log p -100 then costs a large but finite loss and gradient.
    """
    import torch

    d = (ref_logp - logp).masked_fill(~mask.bool(), 0.0).clamp(-K3_CLAMP, K3_CLAMP)
    return ((torch.exp(d) - d - 1.0) * mask).sum()


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Per-pair DPO losses from sequence log-probs of the policy (pi) and the frozen reference (ref).

    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)            (log-ratio margin)
    sigmoid (Rafailov et al. 2023), with conservative label smoothing eps (cDPO):
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023), on per-token mean log-probs (pass those in):
        loss = (h - 1 / (2 * beta))^2
    Returns (losses, chosen_rewards, rejected_rewards) with rewards = beta * (pi - ref), the
    implicit rewards DPO reports.
    """
    import torch.nn.functional as F

    chosen_ratio = pi_chosen.float() - ref_chosen.float()
    rejected_ratio = pi_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}'; use sigmoid or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
