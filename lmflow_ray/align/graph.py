"""The actor graph RAFT and PPO share, and the controller's bookkeeping.

`Graph` starts, once per run: `generation.actors` GenerationActors (vLLM or HF), a
RewardActor, a ReferenceActor (frozen start policy) and the policy's trainer group
(trainer.py: one DeepSpeed engine per data-parallel rank, alive for the whole run; PPO adds
its critic's own group).
Placement: each generation actor asks for `cpus_per_actor` / `gpus_per_actor` (with
`generation.placement_strategy`, as bundles of one placement group: PACK them on few nodes,
SPREAD them across nodes); the reward and reference actors take `reward_actor` /
`reference_actor` resources (half a CPU each by default, so the whole graph fits a 2-core
laptop); each trainer rank takes `scaling.cpus_per_worker` (and a GPU with
`scaling.use_gpu`); Ray places them on a cluster.

Per iteration the controller calls `prompts(it)` (the next slice of the prompt file in a
seeded shuffled order, cycling), `rollout(batch, k, seed)` (the batch split across the
generation actors), `score(...)`, then `update(rows)`: the trainer group fits the rows
(optimizer state and LR schedule carried over) and its rank 0 sends the new weights to every
generation actor (only the adapter for LoRA policies) through Ray's object store or, with
`generation.weight_sync: collective`, over a broadcast group (weight_sync.py). Nothing is
written under OUT between iterations but metrics.jsonl; OUT/model (LoRA: merged once, at the
end) when the run finishes.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from pathlib import Path

from lmflow_ray import console
from lmflow_ray.align.actors import weights_id
from lmflow_ray.config import align_job_kind
from lmflow_ray.data.source import as_spec
from lmflow_ray.errors import RunInterrupted, UserError
from lmflow_ray.models.zoo import is_adapter
from lmflow_ray.outputs import check_output_dir
from lmflow_ray.plots import plot_curves
from lmflow_ray.tracking import MetricsLog
from lmflow_ray.train.plan import Plan

STATE_FILE = "run_state.json"


def last_run_checkpoint(out: Path) -> Path:
    """The newest complete run checkpoint under OUT/checkpoints, or one UserError line."""
    found = sorted((p for p in (Path(out) / "checkpoints").glob("iter_*") if (p / STATE_FILE).is_file()),
                   key=lambda p: int(p.name.removeprefix("iter_")))
    if not found:
        raise UserError(f"resume_from {out}: no run checkpoint in {Path(out) / 'checkpoints'}; runs write them "
                        "with save_iterations: N")
    return found[-1]


class Graph:
    def __init__(self, cfg, out: Path, policy_task: str, total_steps: int, settings: dict | None = None,
                 trainer_overrides: dict | None = None):
        import ray

        from lmflow_ray.align.actors import GenerationActor, ReferenceActor, RewardActor
        from lmflow_ray.align.trainer import TrainerGroup, trainer_setup
        from lmflow_ray.eval.reward import RewardScorer
        from lmflow_ray.eval.run import read_prompts
        from lmflow_ray.models.zoo import resolve_model
        from lmflow_ray.runtime import init_ray

        self.checkpoint_dir, self.iteration = None, 0
        if cfg.resume_from:
            if Path(cfg.resume_from).resolve() != out.resolve():
                raise UserError(f"resume_from {cfg.resume_from} continues that run in place: set output_dir to it too")
            self.checkpoint_dir = last_run_checkpoint(out).resolve()
        check_output_dir(out, cfg.resume_from)
        RewardScorer.check(cfg.reward)  # a bad reward spec fails here, before any actor starts
        _, self.all_prompts = read_prompts(as_spec(cfg.data))
        empty = next((i for i, p in enumerate(self.all_prompts) if not p), None)
        if empty is not None:
            raise UserError(f"{as_spec(cfg.data)}: instance {empty} has an empty prompt; remove it or give it text")
        self.cfg, self.out = cfg, out
        self.base = str(resolve_model(cfg.model))
        if is_adapter(self.base):
            raise UserError(f"model {cfg.model} is a LoRA adapter; merge it first (lmflow-ray merge-lora) or "
                            "start from its base with lora.enabled")
        if cfg.generation.engine == "vllm":
            from lmflow_ray.inference.vllm_engine import check_vllm_model

            check_vllm_model(self.base, on_gpu=cfg.generation.gpus_per_actor > 0)
        policy_cfg, policy_plan = trainer_setup(cfg, self.base, total_steps, policy_task, settings,
                                                **(trainer_overrides or {}))
        out.mkdir(parents=True, exist_ok=True)  # an existing empty dir is fine, as for finetune
        console.log_to(out / "logs")
        init_ray()
        self.gens, self.reward, self.ref, self.pg, self.trainers = [], None, None, None, {}
        self.transport = "ray-object-store"  # or the weight-sync group's backend (gloo, nccl)
        self.job = align_job_kind(cfg)
        self.log: MetricsLog | None = None  # opened by restore() or the first record()
        self.rows: list[dict] = []
        try:
            g = cfg.generation
            seed = next(getattr(cfg, k) for k in ("raft", "ppo", "iterative_dpo") if hasattr(cfg, k))
            # The prompt order, shuffled once (seeded); each iteration takes the next slice, cycling.
            self.order = list(range(len(self.all_prompts)))
            random.Random(seed.seed).shuffle(self.order)
            threads = max(1, int(g.cpus_per_actor))
            lora_rank = cfg.lora.r if cfg.lora.enabled else None
            self.pg = _placement_group(g)
            custom = {} if self.pg is not None else {"resources": dict(g.resources)}  # else in the bundles
            restarts = g.max_restarts if g.weight_sync == "object_store" else 0
            self.gens = [GenerationActor.options(num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor,
                                                 max_restarts=restarts, max_task_retries=restarts,
                                                 **custom, **_bundle(self.pg, i))
                         .remote(g.engine, self.base, cfg.data.template, threads, lora_rank) for i in range(g.actors)]
            ra, fa = cfg.reward_actor, cfg.reference_actor
            self.reward = RewardActor.options(num_cpus=ra.num_cpus, num_gpus=ra.num_gpus).remote(cfg.reward)
            self.ref = ReferenceActor.options(num_cpus=fa.num_cpus, num_gpus=fa.num_gpus).remote(self.base, 1)
            s = cfg.scaling
            self.trainers["policy"] = TrainerGroup("policy", policy_task, policy_cfg, policy_plan, s.num_workers,
                                                   s.cpus_per_worker, s.use_gpu, g.placement_timeout_s, s.resources,
                                                   s.placement_strategy)
            self.policy = self.trainers["policy"]
            if g.weight_sync == "collective":
                self.transport = self._open_sync_group(use_gpu=s.use_gpu and g.gpus_per_actor > 0)
            # Which Ray node each actor runs on (run.json); waits until every actor has started.
            node = lambda a: a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())  # noqa: E731
            self.placement = {"generation": ray.get([node(a) for a in self.gens]),
                              "trainer": ray.get([node(a) for a in self.policy.actors]),
                              "reward": ray.get(node(self.reward)), "reference": ray.get(node(self.ref))}
        except BaseException:
            self.close()
            raise
        self.weights = self.base  # what the generation actors hold: a dir, or weights sent through Ray
        self.params = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p}
        self.started = time.time()
        self.lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)} \
            if cfg.lora.enabled else None

    @property
    def collective(self) -> bool:
        """Weights go over the weight-sync group (gloo / nccl), not through Ray's object store."""
        return self.transport != "ray-object-store"

    def _open_sync_group(self, use_gpu: bool) -> str:
        """The weight-sync group (weight_sync.py): policy trainer rank 0 and every generation actor."""
        import ray

        backend = "nccl" if use_gpu else "gloo"
        world = 1 + len(self.gens)
        rank0 = self.policy.actors[0]
        host, port = ray.get(rank0.serve_sync.remote(world))
        ray.get([rank0.join_sync.remote(host, port, world, backend)]
                + [a.join_sync.remote(host, port, i + 1, world, backend) for i, a in enumerate(self.gens)])
        return backend

    def add_trainer(self, name: str, task: str, config: dict, plan: Plan) -> None:
        from lmflow_ray.align.trainer import TrainerGroup

        s = self.cfg.scaling
        self.trainers[name] = TrainerGroup(name, task, config, plan, s.num_workers, s.cpus_per_worker, s.use_gpu,
                                           self.cfg.generation.placement_timeout_s, s.resources, s.placement_strategy)

    def close(self) -> None:
        """Release the actors, trainer groups and placement group (also after a failed iteration); idempotent."""
        import ray

        if self.log is not None:
            self.log.close()
            self.log = None
        with contextlib.suppress(Exception):  # a dead or hung actor keeps its (small) scratch dir
            ray.get([a.cleanup.remote() for a in self.gens], timeout=10)
        for actor in [*self.gens, self.reward, self.ref]:
            if actor is not None:
                ray.kill(actor)
        for trainer in self.trainers.values():
            trainer.close()
        self.gens, self.reward, self.ref, self.trainers = [], None, None, {}
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None

    # ------------------------------------------------------------------ run checkpoints

    def restore(self) -> tuple[int, dict]:
        """(first iteration to run, the loop's saved extras). With resume_from: every trainer's engine,
        optimizer and scheduler, the metrics rows up to the checkpoint, and the policy's weights pushed
        into the generation actors; the iteration numbering and prompt order go on from there."""
        if self.checkpoint_dir is None:
            return 1, {}
        state = json.loads((self.checkpoint_dir / STATE_FILE).read_text())
        now = self._setup()
        changed = [f"{k}: {state['setup'].get(k)!r} -> {v!r}" for k, v in now.items() if state["setup"].get(k) != v]
        if changed:
            self.close()
            raise UserError(f"resume_from {self.out}: the run was checkpointed with another setup ({'; '.join(changed)}); "
                            "resume with the settings it was started with")
        self.order = state["order"]
        for name, trainer in self.trainers.items():
            trainer.load_checkpoint(str(self.checkpoint_dir / name))
        self.rows = state["rows"]
        self.log = self._metrics_log(state["iteration"])
        self.started -= state.get("elapsed_s", 0.0)
        self.sync()
        print(f"[lmflow-ray] resumed after iteration {state['iteration']} from {self.checkpoint_dir}", flush=True)
        return state["iteration"] + 1, state.get("extra", {})

    def checkpoint(self, it: int, extra: dict | None = None) -> None:
        """Every `save_iterations` iterations: all trainers' state plus the loop's (rows, extras) in
        OUT/checkpoints/iter_NNN, written beside and renamed into place; older ones removed."""
        every = self.cfg.save_iterations
        if not every or it % every:
            return
        root = self.out / "checkpoints"
        tmp = root / f".iter_{it:03d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, trainer in self.trainers.items():
            trainer.save_checkpoint(str((tmp / name).resolve()))
        (tmp / STATE_FILE).write_text(json.dumps({"iteration": it, "rows": self.rows, "extra": extra or {},
                                                  "elapsed_s": time.time() - self.started, "order": self.order,
                                                  "setup": self._setup()}))
        final = root / f"iter_{it:03d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.glob("iter_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _metrics_log(self, restored: int) -> MetricsLog:
        """OUT/metrics.jsonl (rows after iteration `restored` dropped) and the trackers `logging:` turns on."""
        return MetricsLog(self.out, "iteration", restored, self.cfg.logging, self.cfg.model_dump(mode="json"), self.job)

    def _setup(self) -> dict:
        """What a checkpoint's trainer state depends on: resuming under anything else cannot load it."""
        c = self.cfg
        return {"job": self.job, "model": self.base, "trainers": sorted(self.trainers),
                "scaling.num_workers": c.scaling.num_workers,
                "deepspeed": c.deepspeed, "lora.enabled": c.lora.enabled, "lora.r": c.lora.r,
                "data.path": str(Path(c.data.path).resolve()) if c.data.path else str(as_spec(c.data))}

    def failed(self, err: BaseException, it: int) -> BaseException:
        """Release everything; what to raise for `err`, which ended iteration `it`: a trainer process
        that died becomes one line naming the checkpoint to resume from."""
        import ray

        dead = self._dead_process(err) if isinstance(err, ray.exceptions.RayError) else None
        self.close()
        if dead is None:
            return err
        try:
            resume = f"continue with --set resume_from={self.out} (last checkpoint: {last_run_checkpoint(self.out).name})"
        except UserError:
            resume = "no run checkpoint to resume from (set save_iterations: N to write them)"
        return RunInterrupted(f"a {dead} process died during iteration {it} ({type(err).__name__}); {resume}")

    def _dead_process(self, err: BaseException) -> str | None:
        """Which kind of graph process is gone after `err` ("trainer", "reward", ...), or None if all live.

        A trainer rank's death can surface first as its peers' collective failing (a task error), so
        every trainer actor is probed rather than trusting the error's text."""
        import ray

        # Generation actors are restarted by Ray, except in a weight-sync group, which cannot take one back.
        gens = [("generation", self.gens)] if self.collective else []
        for name, actors in [*(("trainer", t.actors) for t in self.trainers.values()),
                             ("reward", [self.reward]), ("reference", [self.ref]), *gens]:
            for actor in actors:
                if actor is None:
                    continue
                try:
                    ray.get(actor.__ray_call__.remote(lambda self: None), timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    return name
        return "trainer" if isinstance(err, ray.exceptions.RayActorError) and "TrainerActor" in str(err) else None

    @contextlib.contextmanager
    def running(self):
        """Around a run's iteration loop: any failure releases every actor, trainer and placement group,
        and a graph process that died becomes one line naming the checkpoint to resume from."""
        try:
            yield self
        except BaseException as e:
            replacement = self.failed(e, self.iteration)
            if replacement is e:
                raise
            raise replacement from None

    def iterations(self, first: int, last: int, budget_s: float | None):
        """Iteration numbers first..last; none starts after `budget_s` seconds (compare methods at equal time)."""
        for it in range(first, last + 1):
            if it > first and self.out_of_time(budget_s):
                print(f"[lmflow-ray] time budget of {budget_s:.0f}s spent after {it - 1} iterations", flush=True)
                return
            self.iteration = it
            yield it

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
        return {"batch": batch, "refs": refs, "weights": weights_id(self.weights), "t0": time.time()}

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
                "finished": [x for s in samples for x in s["finished"]],
                "tokens": sum(t for s in samples for t in s["tokens"]),
                "gen_s": time.time() - t0, "gen_wall_s": time.time() - pending["t0"], "weights": pending["weights"]}

    def rollout(self, batch: list, k: int, seed: int) -> dict:
        return self.collect(self.submit(batch, k, seed))

    def score(self, roll: dict, policy_logps: bool = False) -> dict:
        """Rewards and reference token log-probs (actors); with `policy_logps` the current policy's token
        log-probs and, when there is a critic, its values (the trainer groups), all computed at once."""
        import ray

        t0 = time.time()
        ids = (roll["prompt_ids"], roll["response_ids"])
        calls = {"scores": self.reward.score.remote(roll["prompts"], roll["responses"]),
                 "ref": self.ref.token_logps.remote(*ids)}
        shares = {}
        if policy_logps:
            shares["old"] = (self.policy, self.policy.per_token_async("logps", *ids))
        if "critic" in self.trainers:
            shares["values"] = (self.trainers["critic"], self.trainers["critic"].per_token_async("values", *ids))
        got = {k: tr.reassemble(ray.get(refs)) for k, (tr, refs) in shares.items()}
        got.update(zip(calls, ray.get(list(calls.values()))))
        got["score_s"] = time.time() - t0
        return got

    def update(self, rows: list[dict], epochs: int, seed: int, settings: dict | None = None) -> dict:
        """Fit every trainer group on the rows (at once), then send the policy's weights to the generation
        actors through Ray. Timings, sync bytes and the update's mean metrics (critic ones prefixed)."""
        import ray

        t0 = time.time()
        fits = {name: tr.fit_async(rows, epochs, seed, settings) for name, tr in self.trainers.items()}
        results = {name: ray.get(refs)[0] for name, refs in fits.items()}
        for name, res in results.items():
            self.trainers[name].step = res["optimizer_step"]
        row = dict(results.pop("policy"))
        for name, res in results.items():
            row.update({k: v for k, v in res.items() if k in ("vf_loss",)} | {f"{name}_lr": res["lr"]})
        row["train_s"] = time.time() - t0
        if row.get("steps", 0) == 0:
            print(f"[lmflow-ray] note: {len(rows)} training rows are fewer than one global batch: no optimizer step "
                  "this iteration (sample more, or lower train.micro_batch_size / global_batch_size)", flush=True)
            return row
        row.update(self.sync())
        return row

    def sync(self) -> dict:
        """The policy's weights (its adapter, for LoRA) from trainer rank 0 into every generation actor."""
        import ray

        t0 = time.time()
        collective = self.collective
        sent = self.policy.weights(self.lora is not None, "collective" if collective else "object_store")
        self.weights = {"id": f"policy-step-{self.policy.step}", "adapter": self.lora is not None, "lora": self.lora,
                        **{k: sent[k] for k in ("refs", "manifest") if k in sent}}
        calls = [a.sync.remote(self.weights) for a in self.gens]
        if collective:
            calls.append(self.policy.actors[0].send_weights.remote())
        ray.get(calls)
        return {"sync_s": time.time() - t0, "sync_gather_s": sent["seconds"], "sync_bytes": sent["bytes"],
                "sync_transport": self.transport + ("/adapter" if self.lora else "")}

    def record(self, row: dict, line: str) -> None:
        row["elapsed_s"] = time.time() - self.started
        self.rows.append(row)
        if self.log is None:
            self.log = self._metrics_log(0)
        self.log.write(row)
        print(line, flush=True)

    def finish(self, job: str, curves: dict[str, str]) -> list[dict]:
        """OUT/model (the last policy; LoRA: its adapter in OUT/adapter, merged into OUT/model), reward.png,
        run.json; the actors and trainers are released."""
        try:
            if self.lora is not None:
                from lmflow_ray.models.peft_utils import merge_lora

                self.policy.save(str((self.out / "adapter").resolve()))
                tmp = self.out / ".model.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                merge_lora(self.base, str(self.out / "adapter"), str(tmp))
                shutil.rmtree(self.out / "model", ignore_errors=True)  # a resumed, extended run replaces it
                tmp.rename(self.out / "model")
            else:
                self.policy.save(str((self.out / "model").resolve()))
            if "critic" in self.trainers:
                self.trainers["critic"].save(str((self.out / "critic").resolve()))
        finally:
            self.close()
        plot_curves(self.rows, "iteration", curves, self.out / "reward.png", "reward", markers=True)
        (self.out / "run.json").write_text(json.dumps({
            "job": job, "config": self.cfg.model_dump(mode="json"), "iterations": self.rows,
            "placement": self.placement, "final_model": str(self.out / "model")}, indent=2))
        return self.rows


def _placement_group(g):
    """One placement group over all generation actors (a bundle each), or None for Ray's default scheduling."""
    if g.placement_strategy is None:
        return None
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": g.cpus_per_actor, **({"GPU": g.gpus_per_actor} if g.gpus_per_actor else {}), **g.resources}
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
