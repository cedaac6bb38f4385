"""`lmflow-ray iterative-dpo`: online DPO (LMFlow's iterative DPO) as a Ray actor graph.

Each iteration (actors in graph.py, the trainer in trainer.py):
1. the GenerationActors sample `samples_per_prompt` responses for a batch of prompts;
2. the RewardActor scores them; the ReferenceActor (the frozen starting policy) gives each
   response's log-probs;
3. per prompt, the best and the worst response by reward make a preference pair (skipped and
   counted when their rewards differ by no more than `min_margin`, or the responses are
   identical or empty), with the reference's sequence log-probs attached;
4. the policy's trainer group (alive for the whole run) runs `train.num_epochs` passes of the
   DPO loss (`dpo.beta`, `dpo.loss`, `dpo.label_smoothing`; train/objectives.py) over the pairs,
   against the fixed reference;
5. the new weights go through Ray's object store into the running engines.

metrics.jsonl: iteration, reward_mean, reward_max, pairs, skipped_pairs, kl, the update's loss,
reward_accuracy, reward_margin, chosen_reward, rejected_reward, gen_s / score_s / train_s / sync_s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmflow_ray.config import IterativeDPOConfig
from lmflow_ray.config_loading import load_config


def preference_rows(roll: dict, scores: list[float], ref: list[list[float]], k: int,
                    min_margin: float) -> tuple[list[dict], int]:
    """(DPO rows, skipped prompts): per prompt, its best vs worst sampled response, as the sampled tokens
    (prompt masked), with the reference's summed log-probs of each side precomputed."""
    rows, skipped = [], 0
    for start in range(0, len(scores), k):
        group = range(start, start + k)
        best = max(group, key=lambda n: scores[n])
        worst = min(group, key=lambda n: scores[n])
        p, rb, rw = roll["prompt_ids"][best], roll["response_ids"][best], roll["response_ids"][worst]
        if scores[best] - scores[worst] <= min_margin or not rb or not rw or rb == rw:
            skipped += 1
            continue
        rows.append({"chosen_input_ids": p + rb, "chosen_labels": [-100] * len(p) + rb,
                     "rejected_input_ids": p + rw, "rejected_labels": [-100] * len(p) + rw, "margin": 0.0,
                     "ref_logp": [sum(ref[best]), sum(ref[worst])], "ref_count": [len(rb), len(rw)]})
    return rows, skipped


def run_iterative_dpo(cfg: IterativeDPOConfig) -> list[dict]:
    from lmflow_ray.align.graph import Graph

    d, out = cfg.iterative_dpo, Path(cfg.output_dir)
    k = d.samples_per_prompt
    per_step = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.scaling.num_workers
    total = d.iterations * cfg.train.num_epochs * max(1, d.prompts_per_iteration // per_step)
    # The reference's log-probs arrive with the pairs: no reference copy on the trainer ranks.
    dpo = {**cfg.dpo.model_dump(), "reference": "precompute"}
    graph = Graph(cfg, out, "dpo", total, trainer_overrides={"dpo": dpo})
    with graph.running():
        first, _ = graph.restore()
        for it in graph.iterations(first, d.iterations, d.time_budget_s):
            roll = graph.rollout(graph.prompts(it, d.prompts_per_iteration), k, d.seed + it)
            got = graph.score(roll)
            scores = got["scores"]
            rows, skipped = preference_rows(roll, scores, got["ref"], k, d.min_margin)
            kl = sum(p - sum(q) for p, q in zip(roll["logps"], got["ref"])) / len(scores)
            row = {"iteration": it, "reward_mean": sum(scores) / len(scores), "reward_max": max(scores),
                   "pairs": len(rows), "skipped_pairs": skipped, "kl": kl, "gen_s": roll["gen_s"],
                   "score_s": got["score_s"], "gen_tokens_per_s": roll["tokens"] / max(roll["gen_wall_s"], 1e-9)}
            if rows:
                row.update(graph.update(rows, cfg.train.num_epochs, cfg.seed + it))
            graph.record(row, f"[lmflow-ray] iterative-dpo iteration {it}/{d.iterations}: reward {row['reward_mean']:.4f} "
                              f"pairs {len(rows)} (skipped {skipped}) loss {row.get('loss', float('nan')):.4f} "
                              f"acc {row.get('reward_accuracy', float('nan')):.2f} kl {kl:.3f} "
                              f"gen {row['gen_s']:.1f}s train {row.get('train_s', 0):.1f}s")
            graph.checkpoint(it)
    return graph.finish("iterative-dpo", {"reward_mean": "mean sample reward"})


def iterative_dpo_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(IterativeDPOConfig, config_path, overrides)
    run_iterative_dpo(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
