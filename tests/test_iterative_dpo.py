"""`lmflow-ray iterative-dpo` (online DPO as a Ray actor graph) on tiny-llama with a rule-based reward.

Trained on 12 prompts of configs/iterative_dpo_tiny.yaml's file; the held-out reward (seeded samples
on the other 4 prompts, scored by the same rule) rises, and the update reports DPO's metrics.
"""

from __future__ import annotations

import json

from lmflow_ray.config import IterativeDPOConfig
from lmflow_ray.config_loading import load_config


def _held_out_reward(model, prompts) -> float:
    from lmflow_ray.eval.reward_functions import letter_share
    from lmflow_ray.inference import SamplingParams, make_engine

    groups = make_engine("hf", model).chat(prompts, SamplingParams(max_tokens=24, temperature=1.0, n=8, seed=0))
    responses = [c.text for g in groups for c in g]
    scores = letter_share([p for p in prompts for _ in range(8)], responses)
    return sum(scores) / len(scores)


def test_iterative_dpo_raises_the_held_out_reward(ray_session, repo, tmp_path, tiny_llama):
    from lmflow_ray.align.iterative_dpo import preference_rows, run_iterative_dpo

    data = json.loads((repo / "examples" / "data" / "raft_prompts_tiny.json").read_text())
    train, held = data["instances"][:12], data["instances"][12:]
    (tmp_path / "train.json").write_text(json.dumps({"type": "conversation", "instances": train}))
    out = tmp_path / "out"
    cfg = load_config(IterativeDPOConfig, repo / "configs" / "iterative_dpo_tiny.yaml",
                      [f"output_dir={out}", f"data.path={tmp_path / 'train.json'}", "iterative_dpo.prompts_per_iteration=12"])
    rows = run_iterative_dpo(cfg)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["pairs"] + r["skipped_pairs"] == 12 and r["pairs"] > 0 for r in rows)
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "sync_s"):
        assert key in rows[-1], key
    assert rows[-1]["reward_margin"] > 0  # the policy moved towards the chosen side
    prompts = [x["messages"] for x in held]
    before, after = _held_out_reward(tiny_llama, prompts), _held_out_reward(out / "model", prompts)
    assert after > before + 0.02, (before, after)

    # Pairing: best vs worst of each prompt's group; ties within min_margin skipped.
    roll = {"prompt_ids": [[1]] * 4, "response_ids": [[5], [6], [7], [7]]}
    pairs, skipped = preference_rows(roll, [0.1, 0.9, 0.5, 0.5], [[-1.0], [-2.0], [-3.0], [-3.0]], 2, 0.0)
    assert skipped == 1 and len(pairs) == 1
    assert pairs[0]["chosen_input_ids"] == [1, 6] and pairs[0]["rejected_input_ids"] == [1, 5]
    assert pairs[0]["ref_logp"] == [-2.0, -1.0] and pairs[0]["chosen_labels"] == [-100, 6]
