"""`lmflow-ray raft`: Reward rAnked FineTuning (Dong et al. 2023) as a Ray actor graph.

Each iteration:
1. a batch of prompts (a Ray Dataset of the prompt file, cycled) is split across the
   `GenerationActor`s, which sample K responses per prompt with the current policy;
2. the `RewardActor` scores them; the `ReferenceActor` gives the starting policy's
   log-probs of the same responses (KL estimate: mean of log pi - log ref over samples);
3. the best `keep_top` responses per prompt (at least `min_reward`) become SFT rows: the
   exact prompt and response tokens sampled, only the response learned;
4. the policy's trainer group (alive for the whole run: optimizer state and LR schedule carry
   over) trains `train.num_epochs` passes over them;
5. the new weights (a LoRA policy: the adapter) go from trainer rank 0 through Ray's object
   store into the running generation engines (no restart, no files under OUT).

With `raft.overlap`, the next iteration's sampling runs on the generation actors while this
iteration trains, on the weights from before the update (one update stale: `stale_samples`
in metrics.jsonl); the sync is queued behind it. Off by default.

The actors and the loop's bookkeeping are shared with PPO (graph.py).

metrics.jsonl gets one row per iteration: iteration, reward_mean, reward_max,
reward_kept_mean, kl, kept, loss, lr, rows_unused, gen_s / score_s / train_s / sync_s,
sync_bytes, gen_tokens_per_s. OUT/model/ is the last policy; reward.png plots the reward curve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmflow_ray.config import RaftConfig
from lmflow_ray.config_loading import load_config


def keep_best(rewards: list[list[float]], top: int, min_reward: float | None) -> list[tuple[int, int]]:
    """(prompt index, sample index) of the best `top` responses per prompt, each scoring at least `min_reward`."""
    kept = []
    for i, r in enumerate(rewards):
        order = sorted(range(len(r)), key=lambda j: -r[j])[:top]
        kept += [(i, j) for j in order if min_reward is None or r[j] >= min_reward]
    return kept


def sft_rows(roll: dict, flat: list[int], max_length: int) -> list[dict]:
    """SFT rows of the sampled tokens: prompt (not learned) + response (learned), cut at max_length."""
    rows = []
    for n in flat:
        p, r = roll["prompt_ids"][n], roll["response_ids"][n]
        if r:
            rows.append({"input_ids": (p + r)[:max_length], "labels": ([-100] * len(p) + r)[:max_length]})
    return rows


def run_raft(cfg: RaftConfig) -> list[dict]:
    from lmflow_ray.align.actors import weights_id
    from lmflow_ray.align.graph import Graph

    r = cfg.raft
    per_step = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.scaling.num_workers
    # The LR schedule spans the run: at most prompts x keep_top rows per iteration.
    total = r.iterations * cfg.train.num_epochs * max(1, r.prompts_per_iteration * r.keep_top // per_step)
    graph = Graph(cfg, Path(cfg.output_dir), "finetune", total)
    with graph.running():
        first, _ = graph.restore()
        pending = graph.submit(graph.prompts(first, r.prompts_per_iteration), r.samples_per_prompt, r.seed + first)
        for it in graph.iterations(first, r.iterations, r.time_budget_s):
            if pending is None:
                pending = graph.submit(graph.prompts(it, r.prompts_per_iteration), r.samples_per_prompt, r.seed + it)
            batch, stale = pending["batch"], pending["weights"] != weights_id(graph.weights)
            roll, pending = graph.collect(pending), None
            got = graph.score(roll)
            scores, k = got["scores"], r.samples_per_prompt
            kept = keep_best([scores[i * k:(i + 1) * k] for i in range(len(batch))], r.keep_top, r.min_reward)
            kl = sum(p - sum(q) for p, q in zip(roll["logps"], got["ref"])) / len(scores)
            kept_rewards = [scores[i * k + j] for i, j in kept]
            row = {"iteration": it, "reward_mean": sum(scores) / len(scores), "reward_max": max(scores),
                   "reward_kept_mean": sum(kept_rewards) / len(kept) if kept else None, "kept": len(kept), "kl": kl,
                   "gen_s": roll["gen_s"], "score_s": got["score_s"],
                   "gen_tokens_per_s": roll["tokens"] / max(roll["gen_wall_s"], 1e-9), "stale_samples": stale}
            if r.overlap and it < r.iterations and not graph.out_of_time(r.time_budget_s):
                # The next rollout runs on the generation actors while this update trains (one update behind).
                pending = graph.submit(graph.prompts(it + 1, r.prompts_per_iteration), r.samples_per_prompt, r.seed + it + 1)
            rows = sft_rows(roll, [i * k + j for i, j in kept], cfg.data.max_length)
            if rows:
                row.update(graph.update(rows, cfg.train.num_epochs, cfg.seed + it))
            graph.record(row, f"[lmflow-ray] raft iteration {it}/{r.iterations}: reward {row['reward_mean']:.4f} "
                              f"(kept {row['reward_kept_mean'] if kept else float('nan'):.4f}, {len(kept)} samples) "
                              f"kl {kl:.3f} loss {row.get('loss', float('nan')):.4f} gen {row['gen_s']:.1f}s "
                              f"score {row['score_s']:.1f}s train {row.get('train_s', 0):.1f}s "
                              f"sync {row.get('sync_s', 0):.1f}s")
            graph.checkpoint(it)
    return graph.finish("raft", {"reward_mean": "mean sample reward", "reward_kept_mean": "kept samples"})


def raft_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(RaftConfig, config_path, overrides)
    run_raft(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
