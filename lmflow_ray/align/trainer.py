"""A trainer that lives for a whole RL run: one Ray actor per data-parallel rank, each a DeepSpeed engine.

`TrainerGroup` places `scaling.num_workers` `TrainerActor`s (one placement-group bundle each),
sets up torch.distributed between them (gloo on CPU, NCCL on GPU; MASTER_ADDR/PORT from rank
0's node) and builds the model and DeepSpeed engine once. Its protocol:

- `fit(rows, epochs)`: optimizer steps over a rollout batch (each rank takes its share of the
  shuffled rows); AdamW moments, the LR schedule (spanning the whole run, warmup once) and the
  step counter carry over from one call to the next. Rows that do not fill a last global batch
  are counted (`rows_unused`), a different set each epoch.
- `logps(prompt_ids, response_ids)` / `values(...)`: per-token log-probs of the policy, or the
  critic's values, computed by the engine itself (the same function the loss uses).
- `weights(adapter_only, transport)`: rank 0's weights (gathered first under ZeRO-3) in buckets
  (weight_sync.py): put into Ray's object store, or kept for `send_weights`, a broadcast over the
  weight-sync group (`serve_sync` / `join_sync`: gloo on CPU, NCCL on GPU) to the generation actors.
- `save(dir)`: an HF directory (LoRA: the adapter) plus the tokenizer.

The step itself is `train/step.py::optimizer_step`, the same function `lmflow-ray finetune` uses;
the losses are the tasks of `train/tasks.py` (SFT for RAFT, the policy-gradient and value tasks
for the PPO family).
"""

from __future__ import annotations

import os
import random
import time

import ray

from lmflow_ray.align import weight_sync
from lmflow_ray.train.plan import Plan

CHECKPOINT_TAG = "ds"


@ray.remote
class TrainerActor:
    def __init__(self, rank: int, world: int, task: str, config: dict, plan: Plan):
        self.rank, self.world, self.task_name, self.config, self.plan = rank, world, task, config, plan

    def address(self) -> str:
        return ray.util.get_node_ip_address()

    def setup(self, master: str, port: int) -> int:
        """Join the process group and build the engine; returns the number of trainable parameters."""
        import torch
        import torch.distributed as dist

        from lmflow_ray.train.step import build_engine
        from lmflow_ray.train.tasks import TASKS

        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          LOCAL_RANK="0", TOKENIZERS_PARALLELISM="false")
        gpu = torch.cuda.is_available() and self.plan.use_gpu
        if not dist.is_initialized():
            dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{master}:{port}",
                                    rank=self.rank, world_size=self.world)
        threads = self.plan.threads
        if threads:
            torch.set_num_threads(threads)
        cfg = TASKS[self.task_name].config_class.model_validate(self.config)
        self.cfg = cfg
        self.task = TASKS[self.task_name](cfg, self.plan)
        torch.manual_seed(cfg.seed)
        self.engine = build_engine(self.task, cfg, self.plan.ds_config, self.plan.total_steps)
        self.stage = self.plan.zero_stage
        self.task.setup(self.engine)
        self.step = 0
        # ZeRO-3 partitions each parameter: its full size is ds_numel.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ training

    def fit(self, rows: list[dict], epochs: int, seed: int, settings: dict | None = None) -> dict:
        """`epochs` passes over `rows` (the whole batch; this rank takes its share). Mean metrics per step.

        `settings` update the task's per-iteration settings (e.g. PPO's adaptive kl_coef)."""
        from lmflow_ray.train.step import optimizer_step

        if settings:
            self.plan.ppo = {**self.plan.ppo, **settings}  # the task holds this same Plan

        t = self.cfg.train
        gas = self.plan.accumulation
        per_step = t.micro_batch_size * gas * self.world
        steps = len(rows) // per_step
        collate = self.task.collate
        pad = self.plan.pad_id
        totals: dict[str, float] = {}
        first: dict[str, float] = {}
        t0, n = time.time(), 0
        for epoch in range(epochs):
            order = list(range(len(rows)))
            random.Random(seed * 1000 + epoch).shuffle(order)  # the same order on every rank
            mine = [rows[i] for i in order[: steps * per_step]][self.rank::self.world]
            for s in range(steps):
                self.engine.module.train()
                chunk = mine[s * t.micro_batch_size * gas:(s + 1) * t.micro_batch_size * gas]
                micro = [collate(_columns(chunk[m * t.micro_batch_size:(m + 1) * t.micro_batch_size]), pad)
                         for m in range(gas)]
                result = optimizer_step(self.engine, self.task, micro, self.world)
                self.step += 1
                n += 1
                grad_norm = self.engine.get_global_grad_norm()
                row = {"loss": result.loss, "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                       **self.task.report(result.stats, max(result.units, 1))}
                for k, v in row.items():
                    totals[k] = totals.get(k, 0.0) + v
                if n == 1:  # before the policy moved: ratio 1 wherever the old log-probs are right
                    first = {f"first_step_{k}": row[k] for k in ("approx_kl", "clipfrac") if k in row}
        out = {k: v / n for k, v in totals.items()} if n else {}
        out.update(first)
        out.update(steps=n, optimizer_step=self.step, lr=self.engine.get_lr()[0], fit_s=time.time() - t0,
                   rows_unused=len(rows) - steps * per_step)
        return out

    # ------------------------------------------------------------------ scoring with the engine

    def _per_token(self, fn, prompt_ids: list, response_ids: list) -> list[list[float]]:
        """fn(ids, mask) -> (B, L - 1) over this rank's share (rows rank::world). Every rank runs the same
        number of forwards (ZeRO-3 gathers parameters collectively): a short share is padded with dummy rows."""
        from lmflow_ray.align.actors import _per_response_token

        mine = list(range(self.rank, len(prompt_ids), self.world))
        dummies = -(-len(prompt_ids) // self.world) - len(mine)
        pad = self.plan.pad_id
        self.engine.module.eval()
        out = _per_response_token(fn, pad, [prompt_ids[i] for i in mine] + [[pad]] * dummies,
                                  [response_ids[i] for i in mine] + [[pad]] * dummies)
        return out[:len(mine)]

    def logps(self, prompt_ids: list, response_ids: list) -> list[list[float]]:
        """log p(token | prefix) of every response token under the current policy (this rank's share)."""
        from lmflow_ray.models.scoring import next_token_logps

        def fn(ids, mask):
            ids, mask = ids.to(self.engine.device), mask.to(self.engine.device)
            return next_token_logps(self.engine(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)

        return self._per_token(fn, prompt_ids, response_ids)

    def values(self, prompt_ids: list, response_ids: list) -> list[list[float]]:
        """The critic's value at every response token (this rank's share)."""
        def fn(ids, mask):
            ids, mask = ids.to(self.engine.device), mask.to(self.engine.device)
            return self.engine(input_ids=ids, attention_mask=mask).logits.squeeze(-1)[:, :-1]

        return self._per_token(fn, prompt_ids, response_ids)

    # ------------------------------------------------------------------ weights out

    def _state_dict(self, adapter_only: bool) -> dict | None:
        module = self.engine.module
        if adapter_only:
            from peft import get_peft_model_state_dict

            if self.stage == 3:
                import deepspeed

                params = [p for n, p in module.named_parameters() if "lora_" in n]
                with deepspeed.zero.GatheredParameters(params):
                    state = get_peft_model_state_dict(module)
                    state = {k: v.detach().cpu().clone() for k, v in state.items()}
            else:
                state = get_peft_model_state_dict(module)
        elif self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = module.state_dict()
        if self.rank != 0:
            return None
        if not adapter_only and getattr(module.config, "tie_word_embeddings", False):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # it is the embeddings: sent once
        # Copies: under ZeRO-1/2 every parameter is a view into one flat buffer, and pickling a view
        # (ray.put) writes its whole storage, i.e. the whole model once per tensor.
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def weights(self, adapter_only: bool = False, transport: str = "object_store") -> dict | None:
        """Rank 0: {"bytes", "seconds"} plus, through the object store, "refs" (ObjectRefs of the buckets)
        or, for the collective group, "manifest" (the buckets are kept for `send_weights`). None elsewhere."""
        t0 = time.time()
        state = self._state_dict(adapter_only)
        if state is None:
            return None
        parts = weight_sync.buckets(state)
        out = {"bytes": weight_sync.nbytes(parts), "seconds": 0.0}
        if transport == "collective":
            self.outgoing = parts
            out["manifest"] = weight_sync.manifest(parts)
        else:
            out["refs"] = [ray.put(b) for b in parts]
        out["seconds"] = time.time() - t0
        return out

    def serve_sync(self, world: int) -> tuple[str, int]:
        self.collective = weight_sync.Collective()
        return self.collective.serve(world)

    def join_sync(self, host: str, port: int, world: int, backend: str) -> None:
        self.collective.join(host, port, 0, world, backend)

    def send_weights(self) -> None:
        """Broadcast the buckets the last `weights(transport="collective")` kept to the generation actors."""
        parts, self.outgoing = self.outgoing, None
        self.collective.send(parts)

    def save_checkpoint(self, path: str) -> None:
        """Engine, optimizer, scheduler (each rank its shard) and the step counter, for resuming the run."""
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG, client_state={"step": self.step})

    def load_checkpoint(self, path: str) -> int:
        loaded, client = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed checkpoint for this trainer rank under {path}")
        self.step = int((client or {}).get("step", 0))
        return self.step

    def save(self, out_dir: str) -> str | None:
        """OUT-style HF directory (the policy, the critic, or a LoRA adapter) written by rank 0."""
        from transformers import AutoTokenizer

        state = self._state_dict(adapter_only=False)
        if self.rank != 0:
            return None
        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.plan.tokenizer_path).save_pretrained(out_dir)
        return out_dir


def _columns(rows: list[dict]) -> dict:
    """A list of row dicts as the column batch the tasks' collate functions take."""
    keys = rows[0].keys()
    return {k: [r.get(k) for r in rows] for k in keys}


class TrainerGroup:
    """The driver's handle on one trainer: its actors, their placement group, and the calls on every rank."""

    def __init__(self, name: str, task: str, config: dict, plan: Plan, num_workers: int, cpus_per_worker: float,
                 use_gpu: bool, placement_timeout_s: float = 120.0, resources: dict | None = None,
                 strategy: str = "PACK"):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lmflow_ray.errors import UserError

        self.name = name
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **(resources or {})}
        self.pg = placement_group([bundle] * num_workers, strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise UserError(f"the {name} trainer's {num_workers} worker(s) of {bundle} could not be placed within "
                            f"{placement_timeout_s:.0f}s (cluster: {ray.cluster_resources()}); lower scaling.num_workers "
                            "or scaling.cpus_per_worker") from None
        plan = plan.but(use_gpu=use_gpu, threads=max(1, int(cpus_per_worker)))
        self.actors: list = []
        self.actors = [
            TrainerActor.options(
                num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=i),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(plan.threads)}},
            ).remote(i, num_workers, task, config, plan)
            for i in range(num_workers)]
        try:
            master = ray.get(self.actors[0].address.remote())
            port = ray.get(self.actors[0].__ray_call__.remote(lambda self: _free_port()))
            self.trainable = ray.get([a.setup.remote(master, port) for a in self.actors])[0]
        except BaseException:
            self.close()
            raise
        self.step = 0

    def fit_async(self, rows: list[dict], epochs: int, seed: int, settings: dict | None = None) -> list:
        """Start a fit on every rank (the rows go to the object store once); `ray.get(refs)[0]` is rank 0's result."""
        ref = ray.put(rows)
        return [a.fit.remote(ref, epochs, seed, settings) for a in self.actors]

    def fit(self, rows: list[dict], epochs: int, seed: int, settings: dict | None = None) -> dict:
        result = ray.get(self.fit_async(rows, epochs, seed, settings))[0]
        self.step = result["optimizer_step"]
        return result

    def per_token_async(self, method: str, prompt_ids: list, response_ids: list) -> list:
        """Start `logps` or `values` on every rank (each takes rows rank::world); `reassemble` the results."""
        p, r = ray.put(prompt_ids), ray.put(response_ids)
        return [getattr(a, method).remote(p, r) for a in self.actors]

    def reassemble(self, shares: list[list]) -> list[list[float]]:
        out: list = [None] * sum(len(s) for s in shares)
        for rank, share in enumerate(shares):
            for j, values in enumerate(share):
                out[rank + j * len(self.actors)] = values
        return out

    def logps(self, prompt_ids: list, response_ids: list) -> list[list[float]]:
        return self.reassemble(ray.get(self.per_token_async("logps", prompt_ids, response_ids)))

    def values(self, prompt_ids: list, response_ids: list) -> list[list[float]]:
        return self.reassemble(ray.get(self.per_token_async("values", prompt_ids, response_ids)))

    def weights(self, adapter_only: bool = False, transport: str = "object_store") -> dict:
        return ray.get([a.weights.remote(adapter_only, transport) for a in self.actors])[0]

    def save(self, out_dir: str) -> str:
        return ray.get([a.save.remote(out_dir) for a in self.actors])[0]

    def save_checkpoint(self, path: str) -> None:
        ray.get([a.save_checkpoint.remote(path) for a in self.actors])

    def load_checkpoint(self, path: str) -> None:
        self.step = ray.get([a.load_checkpoint.remote(path) for a in self.actors])[0]

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def trainer_setup(cfg, model_path: str, total_steps: int, task: str, settings: dict | None = None,
                  **replace: dict) -> tuple[dict, Plan]:
    """(config, plan) of a trainer group running `task` (train/tasks.py) for an RL job `cfg`, checked before
    any actor starts.

    The trainer reuses the finetuning config's keys (`train`, `lora`, `scaling`, `deepspeed`); `replace`
    swaps whole sections (the critic: its own learning rate and clipping, no LoRA).
    """
    from pydantic import ValidationError

    from lmflow_ray.config_loading import format_validation_error
    from lmflow_ray.errors import UserError
    from lmflow_ray.models.loading import load_tokenizer
    from lmflow_ray.train.deepspeed_config import fill_deepspeed, resolve_deepspeed
    from lmflow_ray.train.tasks import TASKS

    raw = {"model": model_path, "data": cfg.data.model_dump(include={"path", "hf", "split", "max_length", "template"}),
           "output_dir": cfg.output_dir, "seed": cfg.seed, "train": cfg.train.model_dump(), "lora": cfg.lora.model_dump(),
           "scaling": cfg.scaling.model_dump(), "deepspeed": cfg.deepspeed}
    raw.update(replace)
    try:
        ft = TASKS[task].config_class.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, "config") from None
    if ft.lora.qlora and not ft.scaling.use_gpu:
        raise UserError("lora.qlora needs CUDA GPUs (bitsandbytes 4-bit); set scaling.use_gpu: true or lora.qlora: false")
    if ft.lora.enabled:
        from lmflow_ray.models.peft_utils import check_target_modules, empty_model

        check_target_modules(empty_model(model_path), ft.lora.target_modules)
    t, s = ft.train, ft.scaling
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and s.use_gpu)
    plan = Plan(task=task, model_path=model_path, tokenizer_path=model_path,
                ds_config=fill_deepspeed(resolve_deepspeed(ft.deepspeed), ft, bf16), bf16=bf16,
                pad_id=load_tokenizer(model_path).pad_token_id, total_steps=max(1, total_steps),
                accumulation=ft.gradient_accumulation_steps, ppo=settings or {})
    return ft.model_dump(mode="json"), plan
