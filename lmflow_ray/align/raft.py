"""`lmflow-ray raft`: Reward rAnked FineTuning (Dong et al. 2023) as a Ray actor graph.

Each iteration:
1. a batch of prompts (a Ray Dataset of the prompt file, cycled) is split across the
   `GenerationActor`s, which sample K responses per prompt with the current policy;
2. the `RewardActor` scores them; the `ReferenceActor` gives the starting policy's
   log-probs of the same responses (KL estimate: mean of log pi - log ref over samples);
3. the best `keep_top` responses per prompt (at least `min_reward`) become an SFT dataset;
4. the policy is finetuned on it by the Ray Train + DeepSpeed loop of `lmflow-ray finetune`
   (OUT/iterations/NNN/), starting from the previous iteration's weights;
5. the new weights are synced into the running generation engines (no restart).

metrics.jsonl gets one row per iteration: iteration, reward_mean, reward_max,
reward_kept_mean, kl, kept, gen_s / score_s / train_s / sync_s, gen_tokens_per_s.
OUT/model/ is the last iteration's policy; reward.png plots the reward curve.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from lmflow_ray.config import FinetuneConfig, RaftConfig, load_config
from lmflow_ray.errors import UserError


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


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in rows], [r["reward_mean"] for r in rows], marker="o", label="mean sample reward")
    ax.plot([r["iteration"] for r in rows], [r["reward_kept_mean"] for r in rows], marker="o", label="kept samples")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_raft(cfg: RaftConfig) -> list[dict]:
    import ray.data

    from lmflow_ray.align.actors import GenerationActor, ReferenceActor, RewardActor
    from lmflow_ray.eval.reward import RewardScorer
    from lmflow_ray.eval.run import read_prompts
    from lmflow_ray.models.zoo import resolve_model
    from lmflow_ray.runtime import init_ray
    from lmflow_ray.train.run import run_finetune

    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output_dir {out} is not empty; choose a new output_dir")
    RewardScorer.load(cfg.reward)  # a bad --reward fails here, before any actor starts
    _, prompts = read_prompts(cfg.data.path)
    base = str(resolve_model(cfg.model))
    out.mkdir(parents=True)
    init_ray()
    g, r = cfg.generation, cfg.raft
    # The prompts as a Ray Dataset, shuffled once; each iteration takes the next slice, cycling.
    pool = ray.data.from_items([{"i": i} for i in range(len(prompts))]).random_shuffle(seed=r.seed)
    order = [row["i"] for row in pool.iter_rows()]
    threads = max(1, int(g.cpus_per_actor))
    gens = [GenerationActor.options(num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor, max_restarts=g.max_restarts,
                                    max_task_retries=g.max_restarts).remote(g.engine, base, cfg.data.template, threads)
            for _ in range(g.actors)]
    scorer = RewardActor.options(num_cpus=0.5).remote(cfg.reward)
    ref = ReferenceActor.options(num_cpus=0.5).remote(base, 1)
    params = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p}
    weights, rows = base, []
    log = open(out / "metrics.jsonl", "a")
    t_start = time.time()
    for it in range(1, r.iterations + 1):
        idx = [order[(j + (it - 1) * r.prompts_per_iteration) % len(order)] for j in range(r.prompts_per_iteration)]
        batch = [prompts[j] for j in idx]
        t0 = time.time()
        shards = [batch[a::len(gens)] for a in range(len(gens))]
        results = ray.get([gen.generate.remote(s, r.samples_per_prompt, {**params, "seed": r.seed + it}, weights)
                           for gen, s in zip(gens, shards) if s])
        samples: list[dict] = [None] * len(batch)
        for a, res in enumerate(results):
            for k, s in enumerate(res):
                samples[a + k * len(gens)] = s
        gen_s = time.time() - t0
        flat_prompts = [batch[i] for i, s in enumerate(samples) for _ in s["responses"]]
        flat_prompt_ids = [s["prompt_ids"] for s in samples for _ in s["responses"]]
        flat_resp_ids = [x for s in samples for x in s["response_ids"]]
        flat_resp = [x for s in samples for x in s["responses"]]
        t0 = time.time()
        scores, ref_logps = ray.get([scorer.score.remote(flat_prompts, flat_resp),
                                     ref.logps.remote(flat_prompt_ids, flat_resp_ids)])
        score_s = time.time() - t0
        k = r.samples_per_prompt
        rewards = [scores[i * k:(i + 1) * k] for i in range(len(samples))]
        kept = keep_best(samples, rewards, r.keep_top, r.min_reward)
        pol_logps = [x for s in samples for x in s["logps"]]
        kl = sum(p - q for p, q in zip(pol_logps, ref_logps)) / len(pol_logps)
        row = {"iteration": it, "reward_mean": sum(scores) / len(scores), "reward_max": max(scores),
               "reward_kept_mean": sum(x[2] for x in kept) / len(kept) if kept else None, "kept": len(kept), "kl": kl,
               "gen_s": gen_s, "score_s": score_s,
               "gen_tokens_per_s": sum(t for s in samples for t in s["tokens"]) / max(gen_s, 1e-9)}
        if kept:
            t0 = time.time()
            it_dir = out / "iterations" / f"{it:03d}"
            it_dir.mkdir(parents=True)
            _write_sft(it_dir / "kept.json", batch, kept)
            ft = load_config(FinetuneConfig, None, [], base={
                "model": weights, "data": {"path": str(it_dir / "kept.json"), "max_length": cfg.data.max_length,
                                           "template": cfg.data.template},
                "output_dir": str(it_dir / "train"), "seed": cfg.seed + it, "deepspeed": cfg.deepspeed,
                "train": cfg.train.model_dump(), "lora": cfg.lora.model_dump(), "scaling": cfg.scaling.model_dump()})
            run_finetune(ft)
            row["train_s"] = time.time() - t0
            weights = str(it_dir / "train" / "model")
            t0 = time.time()
            ray.get([gen.sync.remote(weights) for gen in gens])
            row["sync_s"] = time.time() - t0
        row["elapsed_s"] = time.time() - t_start
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"[lmflow-ray] raft iteration {it}/{r.iterations}: reward {row['reward_mean']:.4f} "
              f"(kept {row['reward_kept_mean'] if kept else float('nan'):.4f}, {len(kept)} samples) kl {kl:.3f} "
              f"gen {gen_s:.1f}s score {score_s:.1f}s train {row.get('train_s', 0):.1f}s", flush=True)
    log.close()
    if weights != base:
        shutil.copytree(weights, out / "model")
    _plot(rows, out / "reward.png")
    (out / "run.json").write_text(json.dumps({"job": "raft", "config": cfg.model_dump(mode="json"),
                                              "iterations": rows, "final_model": str(out / "model")}, indent=2))
    return rows


def raft_main(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(RaftConfig, config_path, overrides)
    if cfg.lora.enabled:
        raise UserError("raft: lora.enabled is not supported yet (generation actors sync full weights); "
                        "set lora.enabled: false")
    run_raft(cfg)
    print(f"[lmflow-ray] done: {os.path.abspath(cfg.output_dir)}/model", file=sys.stderr)
    return 0
