"""Pure logic of `lmflow-ray ppo`: advantage estimators, losses, KL controller, rollout collation.

Every expected number is computed by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmflow_ray.align.advantages import AdaptiveKL, advantages, gae, group_advantages, returns_to_go, token_rewards, whiten
from lmflow_ray.config import PPOConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.errors import UserError
from lmflow_ray.train.objectives import k3_kl, ppo_policy_loss, ppo_value_loss
from lmflow_ray.train.tasks import collate_rollouts


def test_token_rewards_put_the_score_on_the_last_token():
    # KL per token: 0.5, -0.5, 1.0; coef 0.1 -> -0.05, 0.05, -0.1; score 2 on the last token.
    assert token_rewards(2.0, [-1.0, -2.0, -1.0], [-1.5, -1.5, -2.0], 0.1) == pytest.approx([-0.05, 0.05, 1.9])


def test_gae_hand_computed():
    # rewards 0, 1; values 0.5, 0.2; gamma 0.9, lam 0.8; V after the end = 0.
    # delta_1 = 1 - 0.2 = 0.8;  A_1 = 0.8
    # delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32;  A_0 = -0.32 + 0.9 * 0.8 * 0.8 = 0.256
    adv, ret = gae([0.0, 1.0], [0.5, 0.2], gamma=0.9, lam=0.8)
    assert adv == pytest.approx([0.256, 0.8])
    assert ret == pytest.approx([0.756, 1.0])  # A + V
    # lam = 1, gamma = 1: A_t = sum of future rewards - V_t (Monte Carlo).
    assert gae([0.0, 1.0], [0.5, 0.2], 1.0, 1.0)[0] == pytest.approx([0.5, 0.8])


def test_returns_to_go_and_whiten():
    assert returns_to_go([1.0, 0.0, 2.0], 0.5) == pytest.approx([1.5, 1.0, 2.0])  # 1 + 0.5 * (0 + 0.5 * 2)
    w = whiten([[1.0, 2.0], [3.0]])  # mean 2, sample std 1
    assert w == [pytest.approx([-1.0, 0.0]), pytest.approx([1.0])]


def test_group_advantages_grpo_and_rloo():
    # GRPO: group [1, 2, 3]: mean 2, std 1 -> -1, 0, 1.
    assert group_advantages([[1.0, 2.0, 3.0]], "grpo")[0] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    # RLOO: x_i - mean of the others: 1 - 2.5 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5.
    assert group_advantages([[1.0, 2.0, 3.0]], "rloo")[0] == pytest.approx([-1.5, 0.0, 1.5])
    # Equal rewards carry no signal.
    assert group_advantages([[0.5, 0.5]], "grpo")[0] == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError):
        group_advantages([[1.0]], "rloo")


def test_advantages_per_estimator():
    old = [[-1.0, -1.0], [-2.0], [-1.0], [-1.0, -3.0]]
    ref = [[-1.0, -2.0], [-2.0], [-1.0], [-1.0, -1.0]]
    scores = [1.0, 0.0, 2.0, 4.0]  # two prompts x two samples
    # GRPO broadcasts each sample's group-normalised score to its tokens; no returns.
    adv, ret = advantages("grpo", scores, 2, old, ref, None, 0.1, 1.0, 1.0)
    s = math.sqrt(0.5)  # std of a pair differing by 1 is sqrt(0.5); by 2 is sqrt(2)
    assert ret is None and adv[0] == pytest.approx([0.5 / s] * 2, rel=1e-4) and adv[1] == pytest.approx([-0.5 / s], rel=1e-4)
    # RLOO: sequence reward minus 0.1 x summed KL (sample 0: KL 1 -> 0.9; sample 3: KL -2 -> 4.2).
    adv, _ = advantages("rloo", scores, 2, old, ref, None, 0.1, 1.0, 1.0)
    assert adv[0] == pytest.approx([0.9, 0.9]) and adv[1] == pytest.approx([-0.9])
    assert adv[2] == pytest.approx([-2.2]) and adv[3] == pytest.approx([2.2, 2.2])
    # PPO without whitening: GAE of the KL-penalised token rewards, returns = A + V.
    values = [[0.0, 0.0], [0.0], [0.0], [0.0, 0.0]]
    adv, ret = advantages("ppo", scores, 2, old, ref, values, 0.1, 1.0, 1.0, whiten_advantages=False)
    assert adv[0] == pytest.approx([0.9, 0.9]) and ret[0] == pytest.approx([0.9, 0.9])
    assert adv[3] == pytest.approx([4.2, 4.2])
    # REINFORCE++: the same returns, whitened over every token of the batch.
    adv, ret = advantages("reinforce++", scores, 2, old, ref, None, 0.1, 1.0, 1.0)
    flat = [x for a in adv for x in a]
    assert ret is None and sum(flat) == pytest.approx(0.0, abs=1e-6) and adv[3][0] == max(flat)


def test_ppo_policy_loss_clips_and_counts():
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.5, 1.1]]))  # ratios 1.5, 1.5, 1.1
    mask = torch.tensor([[True, True, True]])
    loss, clipped = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.5, 1.2) = 1.5; token 2: -1.1.
    assert float(loss) == pytest.approx(-1.2 + 1.5 - 1.1, rel=1e-6)
    assert clipped == 1.0
    # Masked tokens contribute nothing.
    loss, _ = ppo_policy_loss(logp, old, adv, torch.tensor([[False, True, False]]), clip=0.2)
    assert float(loss) == pytest.approx(1.5, rel=1e-6)


def test_ppo_value_loss_and_k3_kl():
    v, old_v, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    mask = torch.tensor([[True]])
    # unclipped (1 - 2)^2 = 1; clipped V = 0.2 -> (0.2 - 2)^2 = 3.24; 0.5 x max = 1.62.
    assert float(ppo_value_loss(v, old_v, ret, mask, clip=0.2)) == pytest.approx(1.62)
    assert float(ppo_value_loss(v, old_v, ret, mask, clip=None)) == pytest.approx(0.5)
    # k3 with d = ref - logp = 1: e - 2; zero when the policy equals the reference.
    assert float(k3_kl(torch.tensor([[0.0]]), torch.tensor([[1.0]]), mask)) == pytest.approx(math.e - 2)
    assert float(k3_kl(torch.tensor([[-0.3]]), torch.tensor([[-0.3]]), mask)) == 0.0


def test_adaptive_kl_moves_towards_the_target():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(kl=3.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert ctl.update(kl=0.9, n_samples=10) < 0.1 * 1.02  # under target: the coefficient falls
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    assert fixed.update(kl=5.0, n_samples=10) == 0.1


def test_collate_rollouts_aligns_values_with_predicting_positions():
    batch = {"input_ids": [[5, 6, 7, 8], [5, 9]], "prompt_len": [2, 1],
             "old_logp": [[-0.1, -0.2], [-0.3]], "adv": [[1.0, 2.0], [3.0]]}
    mb = collate_rollouts(batch, pad_id=0)
    assert mb["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    # Response tokens 7, 8 (positions 2, 3) are predicted at shifted positions 1, 2; token 9 at 0.
    assert mb["mask"].tolist() == [[False, True, True], [True, False, False]]
    assert mb["adv"].tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]
    assert mb["old_logp"][0, 1].item() == pytest.approx(-0.1) and mb["ret"].abs().sum() == 0


def test_ppo_config_errors(tmp_path):
    bad = tmp_path / "grpo.yaml"
    bad.write_text("model: tiny-llama\ndata: x.json\noutput_dir: o\nreward: m:f\nppo: {estimator: grpo}\n")
    with pytest.raises(UserError, match="samples_per_prompt >= 2"):
        load_config(PPOConfig, bad, [])
    with pytest.raises(UserError, match="estimator"):
        load_config(PPOConfig, bad, ["ppo.estimator=a2c"])
    cfg = load_config(PPOConfig, bad, ["ppo.samples_per_prompt=4"])
    assert cfg.ppo.estimator == "grpo" and not cfg.ppo.uses_critic
    with pytest.raises(UserError, match="less than one training batch"):
        load_config(PPOConfig, bad, ["ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=4",
                                     "train.micro_batch_size=16"])


# ----------------------------------------------------------------------------- math hardening


def test_k3_kl_masks_before_exp_and_clamps():
    # Position 1 is padding holding junk (ref 1e4): exp(1e4) = inf, and inf * 0 = NaN without masking first.
    logp = torch.tensor([[-100.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 1e4]])
    mask = torch.tensor([[True, False]])
    kl = k3_kl(logp, ref, mask)
    kl.backward()
    # d = ref - logp = 100 at the learned token, clamped to 10: exp(10) - 10 - 1.
    assert math.isfinite(float(kl)) and float(kl) == pytest.approx(math.exp(10) - 11, rel=1e-5)
    assert torch.isfinite(logp.grad).all()


def test_ppo_policy_loss_clamps_the_log_ratio_and_ignores_padding():
    logp = torch.tensor([[-100.0, 5e3]], requires_grad=True)  # a very unlikely token; junk at the padding
    old = torch.tensor([[0.0, -5e3]])
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[True, False]])
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(logp.grad).all()
    assert float(loss) == pytest.approx(-math.exp(-20), abs=1e-9)  # ratio exp(clamp(-100)) = exp(-20)


def test_ppo_family_refuses_tempered_or_truncated_sampling(repo, tmp_path):
    for override in ("generation.temperature=0.7", "generation.top_p=0.9"):
        with pytest.raises(UserError, match="must be 1 for the PPO family"):
            load_config(PPOConfig, repo / "configs" / "ppo_tiny.yaml", [f"output_dir={tmp_path}", override])


def test_truncated_responses_penalised_and_rows_aligned():
    from lmflow_ray.align.ppo import penalise_truncated, rollout_rows

    assert penalise_truncated([1.0, 0.5], [True, False], 0.25) == [1.0, 0.25]
    assert penalise_truncated([1.0, 0.5], [True, False], None) == [1.0, 0.5]
    roll = {"prompt_ids": [[1, 2], [1, 2], [3]], "response_ids": [[7, 8, 9], [], [4]]}
    got = {"old": [[-1.0, -2.0, -3.0], [], [-0.5]], "ref": [[-1.1, -2.1, -3.1], [], [-0.4]],
           "values": [[0.1, 0.2, 0.3], [], [0.0]]}
    rows = rollout_rows(roll, got, [[1.0, 1.0, 1.0], [], [2.0]], [[0.5, 0.5, 0.5], [], [1.0]])
    assert len(rows) == 2  # the empty response has nothing to learn
    for r in rows:
        n = len(r["input_ids"]) - r["prompt_len"]
        assert len(r["old_logp"]) == len(r["ref_logp"]) == len(r["adv"]) == len(r["ret"]) == len(r["old_value"]) == n


def test_one_ppo_loss_step_moves_log_probs_with_the_advantage_sign(tiny_llama):
    """No Ray, no DeepSpeed: PolicyGradientTask.loss on tiny-llama, one SGD step. Response tokens of the
    row with advantage +1 gain log-probability, those of the row with -1 lose it (old_logp = current,
    so the ratio starts at 1 inside the clip range and every token carries gradient)."""
    from transformers import AutoModelForCausalLM

    from lmflow_ray.models.scoring import next_token_logps
    from lmflow_ray.train.plan import Plan
    from lmflow_ray.train.tasks import PolicyGradientTask

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    plan = Plan(task="policy-gradient", model_path=str(tiny_llama), tokenizer_path=str(tiny_llama), ds_config={},
                bf16=False, pad_id=0, total_steps=1, accumulation=1,
                ppo={"clip_range": 0.2, "estimator": "ppo", "kl_coef": 0.0})
    task = PolicyGradientTask(None, plan)
    prompt, responses = [11, 12, 13], ([21, 22, 23, 24], [31, 32, 33, 34])

    def logps() -> torch.Tensor:
        ids = torch.tensor([prompt + r for r in responses])
        with torch.no_grad():
            return next_token_logps(model(input_ids=ids).logits, ids)[:, len(prompt) - 1:]

    before = logps()
    batch = {"input_ids": [prompt + r for r in responses], "prompt_len": [len(prompt)] * 2,
             "old_logp": [before[i].tolist() for i in range(2)], "ref_logp": [before[i].tolist() for i in range(2)],
             "adv": [[1.0] * 4, [-1.0] * 4]}
    mb = task.collate(batch, pad_id=0)
    loss, stats = task.loss(model, mb)
    assert stats["clipped"] == 0 and stats["approx_kl"] == pytest.approx(0, abs=1e-10)  # ratio 1 at the start
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    delta = logps() - before
    assert (delta[0] > 0).all(), delta  # positive advantage: more likely
    assert (delta[1] < 0).all(), delta  # negative advantage: less likely
