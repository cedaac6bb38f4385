"""`lmflow-ray raft`: Reward rAnked FineTuning (Dong et al. 2023) as a Ray actor graph.

Each iteration:
1. a batch of prompts (a Ray Dataset of the prompt file, cycled) is split across the
   `GenerationActor`s, which sample K responses per prompt with the current policy;
2. the `RewardActor` scores them; the `ReferenceActor` gives the starting policy's
   log-probs of the same responses (KL estimate: mean of log pi - log ref over samples);
3. the best `keep_top` responses per prompt (at least `min_reward`) become an SFT dataset;
4. the policy is finetuned on it by the Ray Train + DeepSpeed loop of `lmflow-ray finetune`
   (OUT/iterations/NNN/), starting from the previous iteration's weights (with `lora.enabled`,
   a fresh adapter per iteration, merged after training: see graph.py);
5. the new weights are synced into the running generation engines (no restart).

With `raft.overlap`, the next iteration's sampling runs on the generation actors while this
iteration trains, on the weights from before the update (one update stale: `stale_samples`
in metrics.jsonl); the sync is queued behind it. Off by default.

The actors and the loop's bookkeeping are shared with PPO (graph.py).

metrics.jsonl gets one row per iteration: iteration, reward_mean, reward_max,
reward_kept_mean, kl, kept, gen_s / score_s / train_s / sync_s, gen_tokens_per_s.
OUT/model/ is the last iteration's policy; reward.png plots the reward curve.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lmflow_ray.config import FinetuneConfig, RaftConfig, load_config


def keep_best(samples: list[dict], rewards: list[list[float]], top: int, min_reward: float | None) -> list[tuple]:
    """(prompt index, response, reward) of the best `top` responses per prompt, at least `min_reward`."""
    kept = []
    for i, (s, r) in enumerate(zip(samples, rewards)):
        order = sorted(range(len(r)), key=lambda j: -r[j])[:top]
        kept += [(i, s["responses"][j], r[j]) for j in order if min_reward is None or r[j] >= min_reward]
    return kept


def _write_sft(path: Path, prompts: list, kept: list[tuple]) -> None:
    if isinstance(prompts[0], list):
        inst = [{"messages": [*prompts[i], {"role": "assistant", "content": resp}]} for i, resp, _ in kept]
        path.write_text(json.dumps({"type": "conversation", "instances": inst}))
    else:
        inst = [{"input": prompts[i], "output": resp} for i, resp, _ in kept]
        path.write_text(json.dumps({"type": "text2text", "instances": inst}))


def run_raft(cfg: RaftConfig) -> list[dict]:
    from lmflow_ray.align.graph import Graph

    r = cfg.raft
    graph = Graph(cfg, Path(cfg.output_dir))
    try:
        pending = graph.submit(graph.prompts(1, r.prompts_per_iteration), r.samples_per_prompt, r.seed + 1)
        for it in range(1, r.iterations + 1):
            if it > 1 and graph.out_of_time(r.time_budget_s):
                print(f"[lmflow-ray] time budget of {r.time_budget_s:.0f}s spent after {it - 1} iterations", flush=True)
                break
            if pending is None:
                pending = graph.submit(graph.prompts(it, r.prompts_per_iteration), r.samples_per_prompt, r.seed + it)
            batch, stale = pending["batch"], pending["weights"] != graph.weights
            roll, pending = graph.collect(pending), None
            got = graph.score(roll)
            scores, k = got["scores"], r.samples_per_prompt
            samples = [{"responses": roll["responses"][i * k:(i + 1) * k]} for i in range(len(batch))]
            kept = keep_best(samples, [scores[i * k:(i + 1) * k] for i in range(len(batch))], r.keep_top, r.min_reward)
            kl = sum(p - sum(q) for p, q in zip(roll["logps"], got["ref"])) / len(scores)
            row = {"iteration": it, "reward_mean": sum(scores) / len(scores), "reward_max": max(scores),
                   "reward_kept_mean": sum(x[2] for x in kept) / len(kept) if kept else None, "kept": len(kept), "kl": kl,
                   "gen_s": roll["gen_s"], "score_s": got["score_s"],
                   "gen_tokens_per_s": roll["tokens"] / max(roll["gen_wall_s"], 1e-9), "stale_samples": stale}
            if r.overlap and it < r.iterations and not graph.out_of_time(r.time_budget_s):
                # The next rollout runs on the generation actors while this update trains (one update behind).
                pending = graph.submit(graph.prompts(it + 1, r.prompts_per_iteration), r.samples_per_prompt, r.seed + it + 1)
            if kept:
                it_dir = Path(cfg.output_dir) / "iterations" / f"{it:03d}"
                it_dir.mkdir(parents=True)
                _write_sft(it_dir / "kept.json", batch, kept)
                row.update(graph.update(it, FinetuneConfig, it_dir / "kept.json"))
            graph.record(row, f"[lmflow-ray] raft iteration {it}/{r.iterations}: reward {row['reward_mean']:.4f} "
                              f"(kept {row['reward_kept_mean'] if kept else float('nan'):.4f}, {len(kept)} samples) "
                              f"kl {kl:.3f} gen {row['gen_s']:.1f}s score {row['score_s']:.1f}s "
                              f"train {row.get('train_s', 0):.1f}s")
    except BaseException:
        graph.close()  # actors and placement group go, whatever failed
        raise
    return graph.finish("raft", {"reward_mean": "mean sample reward", "reward_kept_mean": "kept samples"})


def raft_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(RaftConfig, config_path, overrides)
    run_raft(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
