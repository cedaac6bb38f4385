"""Pure logic of reward modeling, DPO and the alignment metrics, on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmflow_ray.eval import reward_functions as rf
from lmflow_ray.eval.metrics import distinct, diversity, msttr, unique, words
from lmflow_ray.train.objectives import dpo_loss, pairwise_reward_loss, sequence_logps


def test_pairwise_reward_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) - log sigmoid(-1) = log(1 + e^-1) + log(1 + e^1)
    expected = math.log1p(math.exp(-1)) + math.log1p(math.exp(1))
    assert float(pairwise_reward_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    # A margin of 1 on the first pair: -log sigmoid(2 - 1 - 1) = log 2.
    with_margin = pairwise_reward_loss(chosen[:1], rejected[:1], torch.tensor([1.0]))
    assert float(with_margin) == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_sigmoid_ipo_and_label_smoothing_hand_computed():
    pi_c, pi_r = torch.tensor([-10.0]), torch.tensor([-12.0])
    ref_c, ref_r = torch.tensor([-11.0]), torch.tensor([-11.0])
    # h = (-10 + 11) - (-12 + 11) = 2
    losses, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)  # -log sigmoid(0.5 * 2)
    assert float(rc[0]) == pytest.approx(0.5) and float(rr[0]) == pytest.approx(-0.5)
    smooth, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    assert float(smooth[0]) == pytest.approx(0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0)), rel=1e-6)
    ipo, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, loss_type="ipo")
    assert float(ipo[0]) == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # (h - 1/(2 beta))^2 = 1


def test_dpo_small_beta_limit():
    """As beta -> 0 the sigmoid loss is log 2 - beta * h / 2 (first order), whatever h is."""
    h = torch.tensor([3.0, -1.5, 0.25])
    zero = torch.zeros(3)
    for beta in (1e-3, 1e-4):
        losses, _, _ = dpo_loss(h, zero, zero, zero, beta=beta)
        expected = math.log(2) - beta * h / 2
        assert torch.allclose(losses, expected, atol=beta ** 2)
    # Policy equal to the reference: h = 0, loss log 2 for any beta.
    same, _, _ = dpo_loss(zero, zero, zero, zero, beta=5.0)
    assert torch.allclose(same, torch.full((3,), math.log(2)))


def test_sequence_logps_sums_learned_tokens_only():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts token 1 (p .5), position 1 predicts 0 (p .25)
    logp, count = sequence_logps(logits, labels)
    assert float(logp[0]) == pytest.approx(math.log(0.5) + math.log(0.25), rel=1e-5) and int(count[0]) == 2


def test_diversity_metrics_hand_computed():
    texts = ["the cat sat", "the cat ran."]
    assert words(texts[1]) == ["the", "cat", "ran", "."]
    # unigrams: the x2, cat x2, sat, ran, . -> 5 distinct of 7; once: sat, ran, . = 3
    assert distinct(texts, 1) == pytest.approx(5 / 7) and unique(texts, 1) == 3
    # bigrams: (the cat) x2, (cat sat), (cat ran), (ran .) -> 4 distinct of 5; once: 3
    assert distinct(texts, 2) == pytest.approx(4 / 5) and unique(texts, 2) == 3
    assert diversity(texts)["length"] == pytest.approx(3.5)
    # msttr-100: segments of 100 words; 250 words -> 2 segments, the 50-word tail dropped.
    seg_a = " ".join(f"w{i}" for i in range(100))             # 100 distinct -> 1.0
    seg_b = " ".join(["x"] * 50 + [f"y{i}" for i in range(50)])  # 51 distinct -> 0.51
    assert msttr([seg_a, seg_b, "z " * 50]) == pytest.approx((1.0 + 0.51) / 2)
    assert msttr(["too short"]) is None


def test_rule_based_rewards():
    assert rf.json_object([None, None], ['{"a": 1}', "Sure! {}"]) == [1.0, 0.0]
    scores = rf.on_topic(["Where does the cat see the red ball?"] * 2,
                         ["The cat sees the red ball in the garden.", "I do not know."])
    assert scores[0] > 0.5 and scores[1] < 0
    assert rf.length_target([""], [" ".join(["w"] * 20)]) == [1.0]
    # kv_json: object found (0.25) + whole answer (0.25) + 0.5 x share of the prompt's pairs held.
    prompt = [{"role": "user", "content": "Convert to JSON: name=Umar; age=75; city=Seoul"}]
    got = rf.kv_json([prompt] * 4, ['{"name": "Umar", "age": 75, "city": "Seoul"}',
                                    'Here:\n```json\n{"name": "Umar", "age": 7}\n```', "no JSON", '{"name": "Umar"'])
    assert got == [1.0, pytest.approx(0.25 + 0.5 / 3), 0.0, 0.0]


def test_pair_tokenization_skips_and_scored_lists(tiny_llama):
    from lmflow_ray.data.tokenize import cached_tokenizer
    from lmflow_ray.train.pairs import tokenize_pairs_batch

    tok = cached_tokenizer(str(tiny_llama))
    batch = {"prompt": np.array(["q1", "q2", "q3", "q4"], dtype=object),
             "chosen": np.array(["good answer", "same", "", "a " * 80], dtype=object),
             "rejected": np.array(["bad", "same", "x", "b " * 80], dtype=object),
             "margin": np.array([0.5, 0.0, 0.0, 0.0])}
    out = tokenize_pairs_batch(batch, "paired_text_to_text", tok, None, max_length=64)
    assert out["skip"][:3] == ["", "identical", "empty"]
    long_prompt = {**batch, "prompt": np.array(["p " * 100] * 4, dtype=object)}
    assert tokenize_pairs_batch(long_prompt, "paired_text_to_text", tok, None, max_length=32)["skip"][0] == "truncated"
    assert out["margin"][0] == 0.5 and any(x != -100 for x in out["chosen_labels"][0])
    scored = {"input": np.array(["q"], dtype=object),
              "output": np.array([[{"text": "a", "score": 1.0}, {"text": "b", "score": 3.0}, {"text": "c", "score": 1.0}]],
                                 dtype=object)}
    pairs = tokenize_pairs_batch(scored, "text_to_scored_textlist", tok, None, max_length=32)
    # (a,b): b chosen; (a,c): equal scores, no pair; (b,c): b chosen.
    assert len(pairs["skip"]) == 2
    b_ids = tok("b", add_special_tokens=False)["input_ids"]
    assert all(row[-1 - len(b_ids):-1] == b_ids for row in pairs["chosen_input_ids"])


def test_reward_spec_checked_without_loading_weights(tmp_path):
    from lmflow_ray.errors import UserError
    from lmflow_ray.eval.reward import RewardScorer
    from lmflow_ray.models.loading import REWARD_FORMAT_FILE

    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    fn = RewardScorer.check(f"{f}:score")
    assert fn(["p"], ["abc"]) == [3.0]
    rm = tmp_path / "rm"
    (rm / "model").mkdir(parents=True)
    (rm / "model" / REWARD_FORMAT_FILE).write_text("{}")  # no weights: check() must not try to load them
    assert RewardScorer.check(str(rm)) == rm / "model"
    for spec, says in ((f"{f}:nope", "has no function 'nope'"), ("no_such_module_xyz:f", "cannot import"),
                       (str(tmp_path), "neither a reward model")):
        with pytest.raises(UserError, match=says):
            RewardScorer.check(spec)


def test_raft_keeps_the_best_per_prompt_above_the_floor():
    from lmflow_ray.align.raft import keep_best

    rewards = [[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.4, 0.1]]
    assert keep_best(rewards, 1, None) == [(0, 1), (1, 2)]
    assert sorted(keep_best(rewards, 2, None)) == [(0, 1), (0, 3), (1, 0), (1, 2)]
    assert keep_best(rewards, 2, 0.35) == [(0, 1), (0, 3), (1, 2)]  # the floor drops 0.3
    assert keep_best(rewards, 1, 1.0) == []
