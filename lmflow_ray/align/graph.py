"""The actor graph RAFT and PPO share, and the controller's bookkeeping.

`Graph` starts the actors from the config's resources: `generation.actors` GenerationActors
(vLLM or HF), a RewardActor, a ReferenceActor (frozen start policy) and, when asked, a
second ReferenceActor that follows the policy (PPO's sampling log-probs) and (`add_critic`) a
CriticActor.
Placement: each generation actor asks for `cpus_per_actor` / `gpus_per_actor` (with
`generation.placement_strategy`, as bundles of one placement group: PACK them on few nodes,
SPREAD them across nodes); the scorers take half a CPU each, so the whole graph fits a 2-core
laptop; Ray places them on a cluster.

Per iteration the controller calls `prompts(it)` (the next slice of a shuffled Ray Dataset
of the prompt file, cycling), `rollout(batch, k, seed)` (the batch split across the
generation actors), `score(...)`, then trains with `update(...)` (the finetuning loop of
`lmflow-ray finetune`, as a Ray Train + DeepSpeed run in OUT/iterations/NNN/) and `sync`s
the new weights into every running actor. With `lora.enabled` each iteration trains a fresh
adapter on the current policy and merges it (OUT/iterations/NNN/merged): the engines keep
taking full weights, and the next iteration starts from the merged policy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lmflow_ray.errors import UserError


class Graph:
    def __init__(self, cfg, out: Path, policy_scorer: bool = False):
        import ray
        import ray.data

        from lmflow_ray.align.actors import GenerationActor, ReferenceActor, RewardActor
        from lmflow_ray.eval.reward import RewardScorer
        from lmflow_ray.eval.run import read_prompts
        from lmflow_ray.models.zoo import resolve_model
        from lmflow_ray.runtime import init_ray

        if out.exists() and any(out.iterdir()):
            raise UserError(f"output_dir {out} is not empty; choose a new output_dir")
        RewardScorer.load(cfg.reward)  # a bad reward spec fails here, before any actor starts
        _, self.all_prompts = read_prompts(cfg.data.path)
        empty = next((i for i, p in enumerate(self.all_prompts) if not p), None)
        if empty is not None:
            raise UserError(f"{cfg.data.path}: instance {empty} has an empty prompt; remove it or give it text")
        self.cfg, self.out = cfg, out
        self.base = self.weights = str(resolve_model(cfg.model))
        if cfg.generation.engine == "vllm":
            from lmflow_ray.inference.vllm_engine import check_vllm_model

            check_vllm_model(self.base, on_gpu=cfg.generation.gpus_per_actor > 0)
        out.mkdir(parents=True, exist_ok=True)  # an existing empty dir is fine, as for finetune
        init_ray()
        g = cfg.generation
        seed = getattr(cfg, "raft", None) or cfg.ppo
        # The prompts as a Ray Dataset, shuffled once; each iteration takes the next slice, cycling.
        pool = ray.data.from_items([{"i": i} for i in range(len(self.all_prompts))]).random_shuffle(seed=seed.seed)
        self.order = [row["i"] for row in pool.iter_rows()]
        threads = max(1, int(g.cpus_per_actor))
        self.pg = _placement_group(g)
        self.gens = [GenerationActor.options(num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor,
                                             max_restarts=g.max_restarts, max_task_retries=g.max_restarts,
                                             **_bundle(self.pg, i))
                     .remote(g.engine, self.base, cfg.data.template, threads) for i in range(g.actors)]
        self.reward = RewardActor.options(num_cpus=0.5).remote(cfg.reward)
        self.ref = ReferenceActor.options(num_cpus=0.5).remote(self.base, 1)
        self.policy = ReferenceActor.options(num_cpus=0.5).remote(self.base, 1) if policy_scorer else None
        self.critic = None
        self.params = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p}
        self.log = open(out / "metrics.jsonl", "a")
        self.rows: list[dict] = []
        self.started = time.time()

    def close(self) -> None:
        """Release the actors and the placement group (also after a failed iteration); idempotent."""
        import ray

        if not self.log.closed:
            self.log.close()
        for actor in [*self.gens, self.reward, self.ref, self.policy, self.critic]:
            if actor is not None:
                ray.kill(actor)
        self.gens, self.reward, self.ref, self.policy, self.critic = [], None, None, None, None
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None

    def add_critic(self, model_dir: str) -> None:
        from lmflow_ray.align.actors import CriticActor

        self.critic = CriticActor.options(num_cpus=0.5).remote(model_dir, 1)

    def sync_critic(self, model_dir: str) -> None:
        import ray

        ray.get(self.critic.sync.remote(model_dir))

    def out_of_time(self, budget_s: float | None) -> bool:
        return budget_s is not None and time.time() - self.started >= budget_s

    def prompts(self, it: int, n: int) -> list:
        return [self.all_prompts[self.order[(j + (it - 1) * n) % len(self.order)]] for j in range(n)]

    def submit(self, batch: list, k: int, seed: int) -> dict:
        """Start sampling K responses for every prompt of `batch` (split across the generation actors)
        with the current weights; `collect` waits for them. A sync queued meanwhile runs after."""
        shards = [batch[a::len(self.gens)] for a in range(len(self.gens))]
        refs = [gen.generate.remote(s, k, {**self.params, "seed": seed}, self.weights)
                for gen, s in zip(self.gens, shards) if s]
        return {"batch": batch, "refs": refs, "weights": self.weights, "t0": time.time()}

    def collect(self, pending: dict) -> dict:
        """The samples, prompt-major and flat: prompts, prompt/response ids, texts, logps, tokens, gen_s."""
        import ray

        t0 = time.time()
        results = ray.get(pending["refs"])
        batch = pending["batch"]
        samples: list[dict] = [None] * len(batch)
        for a, res in enumerate(results):
            for j, s in enumerate(res):
                samples[a + j * len(self.gens)] = s
        return {"prompts": [batch[i] for i, s in enumerate(samples) for _ in s["responses"]],
                "prompt_ids": [s["prompt_ids"] for s in samples for _ in s["responses"]],
                "response_ids": [x for s in samples for x in s["response_ids"]],
                "responses": [x for s in samples for x in s["responses"]],
                "logps": [x for s in samples for x in s["logps"]],
                "tokens": sum(t for s in samples for t in s["tokens"]),
                "gen_s": time.time() - t0, "gen_wall_s": time.time() - pending["t0"], "weights": pending["weights"]}

    def rollout(self, batch: list, k: int, seed: int) -> dict:
        return self.collect(self.submit(batch, k, seed))

    def score(self, roll: dict, values: bool = False) -> dict:
        """Rewards, reference token log-probs, and (PPO) the policy's token log-probs and the critic's values."""
        import ray

        t0 = time.time()
        ids = (roll["prompt_ids"], roll["response_ids"])
        calls = {"scores": self.reward.score.remote(roll["prompts"], roll["responses"]),
                 "ref": self.ref.token_logps.remote(*ids)}
        if self.policy is not None:
            calls["old"] = self.policy.token_logps.remote(*ids)
        if values and self.critic is not None:
            calls["values"] = self.critic.values.remote(*ids)
        got = dict(zip(calls, ray.get(list(calls.values()))))
        got["score_s"] = time.time() - t0
        return got

    def update(self, it: int, config_cls, data_path: Path, extra: dict | None = None) -> dict:
        """Train the policy on this iteration's data (a Ray Train run), then sync every actor. Timings."""
        import ray

        from lmflow_ray.config import load_config
        from lmflow_ray.models.peft_utils import merge_lora
        from lmflow_ray.train.run import run_finetune

        cfg = self.cfg
        it_dir = data_path.parent
        t0 = time.time()
        ft = load_config(config_cls, None, [], base={
            "model": self.weights, "data": {"path": str(data_path), "max_length": cfg.data.max_length,
                                            "template": cfg.data.template},
            "output_dir": str(it_dir / "train"), "seed": cfg.seed + it, "deepspeed": cfg.deepspeed,
            "train": cfg.train.model_dump(), "lora": cfg.lora.model_dump(), "scaling": cfg.scaling.model_dump(),
            **(extra or {})})
        run_finetune(ft)
        weights = it_dir / "train" / "model"
        if cfg.lora.enabled:
            weights = merge_lora(self.weights, str(weights), str(it_dir / "merged"))
        timings = {"train_s": time.time() - t0}
        self.weights = str(weights)
        t0 = time.time()
        ray.get([a.sync.remote(self.weights) for a in [*self.gens, *([self.policy] if self.policy else [])]])
        timings["sync_s"] = time.time() - t0
        return timings

    def record(self, row: dict, line: str) -> None:
        row["elapsed_s"] = time.time() - self.started
        self.rows.append(row)
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        print(line, flush=True)

    def finish(self, job: str, curves: dict[str, str]) -> list[dict]:
        """OUT/model (the last policy), reward.png, run.json; the actors are released."""
        self.close()
        if self.weights != self.base:
            shutil.copytree(self.weights, self.out / "model")
        plot(self.rows, curves, self.out / "reward.png")
        (self.out / "run.json").write_text(json.dumps({
            "job": job, "config": self.cfg.model_dump(mode="json"), "iterations": self.rows,
            "final_model": str(self.out / "model")}, indent=2))
        return self.rows


def _placement_group(g):
    """One placement group over all generation actors (a bundle each), or None for Ray's default scheduling."""
    if g.placement_strategy is None:
        return None
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": g.cpus_per_actor, **({"GPU": g.gpus_per_actor} if g.gpus_per_actor else {})}
    pg = placement_group([bundle] * g.actors, strategy=g.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=g.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise UserError(f"generation.placement_strategy {g.placement_strategy}: {g.actors} bundles of {bundle} could not "
                        f"be placed within {g.placement_timeout_s:.0f}s on this cluster "
                        f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs); lower generation.actors or the per-actor "
                        "resources, or use PACK / SPREAD") from None
    return pg


def _bundle(pg, i: int) -> dict:
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)}


def plot(rows: list[dict], curves: dict[str, str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in curves.items():
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
