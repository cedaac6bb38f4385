"""`lmflow-ray finetune`: checks the config, builds the data, runs Ray Train, writes OUT/.

Everything a user can get wrong (keys, types, model, dataset, DeepSpeed config, QLoRA
without CUDA, batch sizes, an output dir that already holds a run) is checked here, in
the driver, before any worker starts. Then `TorchTrainer` runs `loop.train_worker` on N
workers with the tokenized dataset, restarting from the last checkpoint after a worker
failure (`max_failures`). The output directory follows the project contract:
model/, metrics.jsonl, run.json, checkpoints/ (+ loss.png).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

from lmflow_ray import console
from lmflow_ray.config import FinetuneConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.errors import RunInterrupted, UserError
from lmflow_ray.models.zoo import is_adapter
from lmflow_ray.outputs import check_output_dir
from lmflow_ray.plots import plot_curves
from lmflow_ray.train.deepspeed_config import fill_deepspeed, resolve_deepspeed
from lmflow_ray.train.plan import Plan
from lmflow_ray.train.tasks import TASKS, job_kind

RUN_NAME = "ray_train"
STORAGE_FILE = "storage.json"  # OUT/storage.json: where this run's checkpoints live when not under OUT


def checkpoint_root(cfg: FinetuneConfig, out: Path) -> tuple[str, str]:
    """(storage_path, run name) for Ray Train. Default: OUT/checkpoints/ray_train. With `storage_path`
    (any pyarrow filesystem URI: s3://, gs://, hdfs://, file:// on a shared mount) the checkpoints go
    to STORAGE/<output dir name>-<hash of its path>, where they outlive the node that wrote them."""
    if not cfg.storage_path:
        return str(out / "checkpoints"), RUN_NAME
    import hashlib

    return cfg.storage_path.rstrip("/"), f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"


def _filesystem(path: str, key: str = "storage_path"):
    """(pyarrow filesystem, path in it) for a local path or a URI; `key` names the setting in errors."""
    import pyarrow.fs

    if "://" in path:
        try:
            return pyarrow.fs.FileSystem.from_uri(path)
        except (pyarrow.ArrowInvalid, OSError) as e:
            raise UserError(f"{key}: {path} is not a storage URI pyarrow can open ({e}); use a local path, file://, "
                            "s3://, gs:// or hdfs://") from None
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def find_checkpoint(path: str) -> str:
    """The newest Ray Train checkpoint of a run: under its output dir, in the storage its
    OUT/storage.json names, or the checkpoint dir itself; local paths and storage URIs alike."""
    import pyarrow.fs

    if "://" not in path and (Path(path) / STORAGE_FILE).is_file():
        path = json.loads((Path(path) / STORAGE_FILE).read_text())["checkpoints"]
    fs, root = _filesystem(path, "resume_from")
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""

    def step(state_file: str) -> int:
        with fs.open_input_stream(state_file) as f:
            return json.loads(f.read())["step"]

    if fs.get_file_info(f"{root}/trainer_state.json").type == pyarrow.fs.FileType.File:
        return path
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise UserError(f"resume_from: cannot list {path} ({e})") from None
    found = sorted((i.path for i in infos if i.base_name == "trainer_state.json"
                    and Path(i.path).parent.name.startswith("checkpoint_")), key=step)
    if not found:
        raise UserError(f"resume_from: no checkpoint found under {path}; pass a finetune output dir that has "
                        "checkpoints/ (or the storage_path URI of its checkpoints)")
    return scheme + str(Path(found[-1]).parent)


def check_resume_kind(resume_from: str, checkpoint: str, kind: str) -> None:
    """One line when `resume_from` is a run of another job kind (its run.json, or the job its checkpoint
    records) — or an RL run, whose checkpoints Ray Train cannot load."""
    if "://" in resume_from:
        return
    found = None
    run = Path(resume_from) / "run.json"
    if run.is_file():
        found = json.loads(run.read_text()).get("job")
    state = Path(checkpoint) / "trainer_state.json"
    if found is None and "://" not in checkpoint and state.is_file():
        found = json.loads(state.read_text()).get("job")
    if found is not None and found != kind:
        raise UserError(f"resume_from {resume_from}: that is a {found} run; `lmflow-ray {kind}` resumes only its own "
                        f"runs (continue it with `lmflow-ray {found} ... --set resume_from={resume_from}`, or start this "
                        "job from its model with --set model=...)")


def preflight(cfg: FinetuneConfig) -> dict:
    """All config-time checks; returns what the run needs (paths, DeepSpeed config)."""
    from lmflow_ray.data.source import as_spec, validate
    from lmflow_ray.models.zoo import resolve_model

    if cfg.lora.qlora and not cfg.scaling.use_gpu:
        raise UserError("lora.qlora needs CUDA GPUs (bitsandbytes 4-bit); set scaling.use_gpu: true on a GPU "
                        "machine, or set lora.qlora: false to use plain LoRA")
    if cfg.lora.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("lora.qlora needs bitsandbytes; install lmflow-ray[gpu] on the GPU machine") from None
    ds = resolve_deepspeed(cfg.deepspeed)
    stage = ds["zero_optimization"].get("stage", 0)
    if cfg.scaling.elastic and stage == 3:
        raise UserError("scaling.num_workers [min, max] (elastic) reloads checkpoints with another worker count, which "
                        "ZeRO-3 shards cannot do here; use deepspeed: zero2 (or zero0), or a fixed num_workers")
    if cfg.lisa.enabled and stage != 0:
        raise UserError(f"lisa.enabled needs deepspeed: zero0 (got ZeRO stage {stage}); LISA already trains "
                        "only a few layers, so sharding buys little")
    out = Path(cfg.output_dir)
    if cfg.storage_path:
        _filesystem(cfg.storage_path)
    resume = None
    if cfg.resume_from:
        if any(Path(cfg.resume_from).glob("checkpoints/iter_*")):
            raise UserError(f"resume_from {cfg.resume_from}: that is an RL run (RAFT / PPO / iterative DPO); resume it "
                            "with the command that wrote it, or start this job from its model with --set model=...")
        resume = find_checkpoint(cfg.resume_from)
        check_resume_kind(cfg.resume_from, resume, job_kind(cfg))
    check_output_dir(out, cfg.resume_from)
    model_path = resolve_model(cfg.model)
    if is_adapter(model_path):
        raise UserError(f"model {cfg.model} is a LoRA adapter; merge it first (lmflow-ray merge-lora) or train its base")
    summary = validate(as_spec(cfg.data))
    vision = _check_vision(cfg, model_path, summary.type)
    if (cfg.lora.enabled or cfg.lisa.enabled) and vision is None:
        from lmflow_ray.models.peft_utils import check_target_modules, decoder_layers, empty_model

        skeleton = empty_model(str(model_path), cfg.trust_remote_code)
        if cfg.lora.enabled:
            check_target_modules(skeleton, cfg.lora.target_modules)
        else:
            decoder_layers(skeleton)
    from lmflow_ray.data.stats import check_first_row

    if summary.type in ("conversation", "text2text", "text_only"):
        check_first_row(as_spec(cfg.data), summary.type, str(model_path), cfg.data.template)
    return {"model_path": str(model_path), "ds": ds, "resume": resume, "data_summary": summary, "vision": vision}


def _check_vision(cfg: FinetuneConfig, model_path: Path, data_type: str) -> dict | None:
    """For image_text data: the vision-language model to train ({"tower": path} when it is assembled
    first from `model` + `vlm.vision_tower`, else {}); None for text data. Mismatches are one line."""
    from lmflow_ray.models.vision import is_vision_tower, is_vlm
    from lmflow_ray.models.zoo import resolve_model

    vlm = is_vlm(model_path)
    if data_type != "image_text":
        if vlm or cfg.vlm.vision_tower:
            raise UserError(f"{'model ' + cfg.model + ' is a vision-language model' if vlm else 'vlm.vision_tower is set'}"
                            f" but {cfg.data.path or cfg.data.hf} holds {data_type} data; vision-language tuning "
                            "trains on image_text data")
        return None
    if type(cfg) is not FinetuneConfig:
        raise UserError("image_text data trains with `lmflow-ray finetune` (vision-language SFT); reward models and "
                        "DPO take text data")
    if cfg.lisa.enabled:
        raise UserError("lisa.enabled does not apply to vision-language tuning; use vlm.trainable (or lora.enabled)")
    if cfg.data.packing:
        raise UserError("data.packing does not apply to image_text data (each row keeps its own images); remove it")
    if cfg.lora.qlora or cfg.rope_scaling:
        raise UserError(f"{'lora.qlora' if cfg.lora.qlora else 'rope_scaling'} is for text models here; vision-language "
                        "tuning takes full or LoRA training without it")
    if cfg.lora.enabled and "language_model" not in cfg.vlm.trainable:
        raise UserError("lora.enabled puts adapters on the language model, but vlm.trainable leaves it frozen; add "
                        "language_model to vlm.trainable, or set lora.enabled: false")
    if vlm:
        if cfg.vlm.vision_tower:
            raise UserError(f"model {cfg.model} is already a vision-language model (it has its vision tower); remove "
                            "vlm.vision_tower, or set model to a causal LM to build a new one")
        return {}
    config = json.loads((model_path / "config.json").read_text())
    if config.get("vision_config") is not None:
        raise UserError(f"model {cfg.model} is a {config.get('model_type')} vision-language model; vision-language "
                        "tuning here trains LLaVA models (model_type llava): build one with vlm.vision_tower from a causal LM")
    if not cfg.vlm.vision_tower:
        raise UserError(f"{cfg.data.path or cfg.data.hf} holds image_text data and model {cfg.model} is a text model; "
                        "set vlm.vision_tower (a CLIP / SigLIP vision model, or the zoo's tiny-clip) to build a "
                        "vision-language model from it, or set model to one (a LLaVA directory)")
    tower = resolve_model(cfg.vlm.vision_tower)
    if not is_vision_tower(tower):
        raise UserError(f"vlm.vision_tower {cfg.vlm.vision_tower}: {tower} is not a CLIP / SigLIP vision model "
                        "(its config.json model_type should be clip_vision_model, siglip_vision_model, clip or siglip)")
    return {"tower": str(tower)}


def run_finetune(cfg: FinetuneConfig) -> dict:
    from lmflow_ray.runtime import init_ray

    task = job_kind(cfg)
    started = time.time()
    pre = preflight(cfg)
    ray = init_ray()
    if cfg.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) < cfg.scaling.num_workers:
        raise UserError(f"scaling.use_gpu: the Ray cluster has {ray.cluster_resources().get('GPU', 0):.0f} GPUs, "
                        f"{cfg.scaling.num_workers} workers need one each; set scaling.use_gpu: false or add GPUs")

    import ray.train as ray_train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmflow_ray.models.loading import load_tokenizer
    from lmflow_ray.train.loop import train_worker

    out = Path(cfg.output_dir).resolve()
    task_key = task
    if pre["vision"] is not None:
        task_key = "vision-finetune"
        if pre["vision"].get("tower"):  # LM + vision tower + a new projector, once (a resumed run finds it)
            from lmflow_ray.models.vision import assemble

            base = out / "base_model"
            parts = {"model": pre["model_path"], "vision_tower": pre["vision"]["tower"], "projector": cfg.vlm.projector,
                     "seed": cfg.seed}
            made = base / "vlm_parts.json"
            earlier = json.loads(made.read_text()) if made.is_file() else None
            if earlier is not None and earlier != parts:
                raise UserError(f"{base} was assembled from {earlier}, this config asks for "
                                f"{parts}; resume with the run's own settings, or use a new output_dir")
            if earlier is None:
                print(f"[lmflow-ray] assembling a vision-language model: {cfg.model} + {cfg.vlm.vision_tower} + "
                      f"{cfg.vlm.projector} projector -> {base}", flush=True)
                tmp = out / ".base_model.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                assemble(pre["model_path"], pre["vision"]["tower"], cfg.vlm.projector, tmp, cfg.seed)
                (tmp / "vlm_parts.json").write_text(json.dumps(parts) + "\n")
                shutil.rmtree(base, ignore_errors=True)
                os.replace(tmp, base)  # an interrupted assembly never leaves a half model
            pre["model_path"] = str(base)
    tokenizer = load_tokenizer(pre["model_path"])
    d = cfg.data
    t, s = cfg.train, cfg.scaling
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and s.use_gpu)
    dataset, eval_dataset, info, extras = TASKS[task_key].datasets(cfg, pre["model_path"], tokenizer.pad_token_id, bf16)
    per_step = t.micro_batch_size * s.num_workers * cfg.gradient_accumulation_steps
    steps_per_epoch = info["rows"] // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{d.path}: {info['rows']} training rows are fewer than one global batch ({per_step}); "
                        "lower train.micro_batch_size / global_batch_size or add data")
    total = steps_per_epoch * t.num_epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.num_epochs)
    out.mkdir(parents=True, exist_ok=True)
    console.log_to(out / "logs")
    plan = Plan(
        task=task_key, model_path=pre["model_path"], tokenizer_path=pre["model_path"], output_dir=str(out),
        ds_config=fill_deepspeed(pre["ds"], cfg, bf16), bf16=bf16, pad_id=tokenizer.pad_token_id,
        resume_checkpoint=str(pre["resume"]) if pre["resume"] else None, has_eval=eval_dataset is not None,
        accumulation=cfg.gradient_accumulation_steps, steps_per_epoch=steps_per_epoch, total_steps=total,
        global_batch=per_step, **extras,
    )
    workers = f"{s.min_workers}-{s.num_workers}" if s.elastic else str(s.num_workers)
    print(f"[lmflow-ray] {info['rows']} {'packed ' if info['packing'] else ''}rows of {info['type']}, "
          f"{workers} worker(s), ZeRO-{plan.zero_stage}, "
          f"{steps_per_epoch} steps/epoch, {total} steps"
          + (f", {info['eval_rows']} eval rows" if info["eval_rows"] else ""), flush=True)
    resume = pre["resume"]
    storage, run_name = checkpoint_root(cfg, out)
    datasets = {"train": dataset, **({"eval": eval_dataset} if eval_dataset is not None else {})}
    if s.elastic or cfg.max_failures:
        # Restarts must find every row again: materialized blocks on a node that died are gone (Ray cannot
        # rebuild blocks that crossed from the driver to the workers), so the rows are written once to
        # the run's storage and Ray Train streams them from there, split anew for however many workers
        # a restart has.
        # (TASKS[...].streamed: what the task computes as rows stream to the workers, never written out:
        # e.g. image pixels)
        datasets = {name: TASKS[task_key].streamed(_durable(ds, f"{storage}/{run_name}/dataset/{name}"), info)
                    for name, ds in datasets.items()}
        shards = None
    else:
        # A fixed worker count: each worker gets its equal share of the materialized rows up front and
        # iterates it itself. Ray Train's streaming split would start a dataset manager and a split
        # coordinator per dataset (two more processes, ~3 s before the first step) for rows already in
        # the object store; the split is also the same on every run and restart of this run.
        shards = {name: [TASKS[task_key].streamed(part, info) for part in ds.split(s.num_workers, equal=True)]
                  for name, ds in datasets.items()}
        datasets = {}
    if s.elastic:
        _refresh_cluster_view()
    if cfg.storage_path:  # `resume_from: OUT` finds them there
        (out / STORAGE_FILE).write_text(json.dumps({"checkpoints": f"{storage}/{run_name}"}) + "\n")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan, "shards": shards},
        scaling_config=ScalingConfig(num_workers=(s.min_workers, s.num_workers) if s.elastic else s.num_workers,
                                     use_gpu=s.use_gpu, placement_strategy=s.placement_strategy,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {}),
                                                           **s.resources}),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            # An elastic run exists to go on after losing workers: it restarts (up to 3 times unless set).
            failure_config=FailureConfig(max_failures=cfg.max_failures or (3 if s.elastic else 0)),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                 "OMP_NUM_THREADS": str(max(1, int(s.cpus_per_worker)))}},
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except ray_train.TrainingFailedError as e:
        raise RunInterrupted(_failure_line(e, out, storage, run_name, cfg)) from e
    if result.error:
        raise result.error
    final = dict(result.metrics or {})
    TASKS[task_key].finish(cfg, out / "model", info, tokenizer.pad_token_id)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        plot_curves(rows, "step", {"loss": "loss"}, out / "loss.png", "loss (mean over learned tokens)", "training loss")
    from importlib.metadata import version  # not the packages themselves: DeepSpeed's import alone is ~2 s

    run = {
        "job": task, "config": cfg.model_dump(mode="json"), "resolved_model": pre["model_path"],
        "data": {"type": info["type"], "rows": info["rows"],
                 "instances": pre["data_summary"].instances,
                 "eval_rows": info["eval_rows"], "packing": info["packing"], "skipped_pairs": info.get("skipped")},
        "plan": {k: getattr(plan, k) for k in ("accumulation", "steps_per_epoch", "total_steps", "bf16")},
        "deepspeed": plan.ds_config,
        "versions": {"lmflow_ray": __import__("lmflow_ray").__version__,  # also when run from a source tree
                     **{name: version(name) for name in ("ray", "torch", "transformers", "deepspeed")},
                     "python": platform.python_version()},
        "resumed_from": str(resume) if resume else None,
        "start_time": started, "end_time": time.time(), "final": final,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "checkpoint_storage": f"{storage}/{run_name}",
    }
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(run, indent=2, default=str))
    os.replace(tmp, out / "run.json")
    print(f"[lmflow-ray] done: {out}/model  (steps {final.get('step')}, save check max|Δlogits| "
          f"{final.get('save_check_max_abs_diff')})", flush=True)
    return run


def _refresh_cluster_view() -> None:
    """Have the cluster's autoscaling coordinator re-read the nodes before an elastic run sizes itself.

    Ray Train sizes an elastic worker group from the reservations of the cluster's long-lived
    `AutoscalingCoordinator` actor, which re-reads the nodes only every 20 s: a node that joined just
    before the run would be missed, and the run would start with fewer workers than the cluster has.
    Best effort: the coordinator is Ray's internal actor (absent on a cluster that has not had one;
    a new one reads the nodes when it starts)."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("lmflow-ray", recompute=True), timeout=10)
    except Exception:  # noqa: BLE001 - absent, or an internal API that changed: Ray's own 20 s view stands
        pass


def _durable(ds, path: str):
    """The dataset written as Parquet to `path` (a local path or URI) and read back lazily."""
    import ray.data

    fs, where = _filesystem(path)
    fs.create_dir(where, recursive=True)
    fs.delete_dir_contents(where)  # a resumed run writes its rows again
    ds.write_parquet(path)
    # Ray Data 2.60's default Parquet reader (datasource V2) starts 32 footer-reader actors per read, built
    # for listing many files on object stores: ~5 s and dozens of process starts on a small machine for
    # the few files written here. The V1 reader reads them in ~0.1 s.
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, file_extensions=["parquet"])
    finally:
        context.use_datasource_v2 = v2


def _failure_line(error: Exception, out: Path, storage: str, run_name: str, cfg: FinetuneConfig) -> str:
    """One line for a run Ray Train gave up on (a worker or its node died with no restarts left)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "died" in line or re.match(r"^[\w.]+(Error|Exception): ", line)),
                 lines[-1] if lines else type(error).__name__)
    try:
        where = f"its last checkpoint ({find_checkpoint(str(out) if cfg.storage_path else f'{storage}/{run_name}')})"
    except UserError:
        where = "no checkpoint was written yet (set train.save_steps)"
    elastic = "" if cfg.scaling.elastic else "; or let it go on with fewer workers: scaling.num_workers: [MIN, MAX]"
    return (f"training stopped: {cause[:300]}; {where}: continue with --set resume_from={out} "
            f"(or raise max_failures{elastic})")


def finetune_main(config_path: str, overrides: list[str], task: str = "finetune") -> int:
    """`lmflow-ray finetune | reward-model | dpo --config F`: one worker loop, three objectives."""
    cfg = load_config(TASKS[task].config_class, config_path, overrides)
    run_finetune(cfg)
    return 0
