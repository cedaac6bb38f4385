"""`lmflow-ray ppo` as a Ray actor graph on tiny-llama with a rule-based reward (configs/ppo_tiny.yaml).

- GRPO (critic-free, run from the CLI, SIGKILLed after its second checkpoint and resumed) and PPO
  (critic + GAE): the mean sample reward rises clearly over the iterations; the KL to the
  reference stays finite; each update's first step has ratio 1 (old log-probs right); the update logs its losses; PPO trains
  and saves its critic (its own trainer), whose values move towards the rewards.
- A trainer process that dies ends the run with one line naming the checkpoint to resume from.
- The CLI: `lmflow-ray ppo` with a bad estimator / group size exits 2 with one line.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import run_cli

from lmflow_ray.config import PPOConfig
from lmflow_ray.config_loading import load_config


def _run(repo, out, *overrides):
    from lmflow_ray.align.ppo import run_ppo

    cfg = load_config(PPOConfig, repo / "configs" / "ppo_tiny.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}", *overrides])
    return run_ppo(cfg)


def _rises(rows):
    rewards = [r["reward_mean"] for r in rows]
    half = len(rewards) // 2
    assert rewards[-1] > rewards[0] + 0.02, rewards
    assert sum(rewards[half:]) / (len(rewards) - half) > sum(rewards[:half]) / half + 0.01, rewards
    assert all(math.isfinite(r["kl"]) for r in rows), [r["kl"] for r in rows]
    # Every iteration's first optimizer step runs on the policy that computed the old log-probs: ratio 1
    # (a stale policy, other sampling settings or misaligned tokens would show here).
    assert all(r["first_step_approx_kl"] < 1e-6 and r["first_step_clipfrac"] == 0 for r in rows), \
        [(r["first_step_approx_kl"], r["first_step_clipfrac"]) for r in rows]


def test_ppo_with_critic_raises_the_reward(ray_session, repo, tmp_path, tiny_llama):
    """Two data-parallel trainer ranks under ZeRO-2 (policy and critic groups alike)."""
    out = tmp_path / "ppo"
    rows = _run(repo, out, "deepspeed=zero2", "scaling.num_workers=2", "train.micro_batch_size=8")
    _rises(rows)
    assert all(r["vf_loss"] >= 0 for r in rows) and rows[-1]["vf_loss"] < rows[0]["vf_loss"]
    assert (out / "critic" / "config.json").is_file()
    # The critic (its own trainer) starts at 0 everywhere (zeroed value head) and learns values near the
    # reward scale, with its own learning rate.
    assert rows[0]["value_mean"] == 0.0 and abs(rows[-1]["value_mean"]) > 0.1, [r["value_mean"] for r in rows]
    assert rows[-1]["critic_lr"] > 0


def test_ppo_cli_bad_config_exits_2(repo, tmp_path, cli):
    for override, fragment in (("ppo.estimator=grpo", "samples_per_prompt >= 2"),
                               ("ppo.clip_range=1.5", "clip_range")):
        proc = cli("ppo", "--config", str(repo / "configs" / "ppo_tiny.yaml"), "--set",
                   f"output_dir={tmp_path / 'x'}", "--set", "ppo.samples_per_prompt=1", "--set", override)
        assert proc.returncode == 2, proc.stderr
        assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.e2e
def test_run_killed_mid_way_resumes_with_continuous_numbering(ray_session, repo, tmp_path, tiny_llama):
    """SIGKILL the driver after iteration 2 of 4 was checkpointed (its actors die with it); resume_from
    continues at the next iteration with the same numbering, and the rows from before the kill are kept.
    Both drivers join the session's cluster (RAY_ADDRESS), as jobs join theirs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "resume"
    args = [sys.executable, "-m", "lmflow_ray", "ppo", "--config", str(repo / "configs" / "ppo_tiny.yaml"),
            "--set", f"output_dir={out}", "--set", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
            "--set", "ppo.estimator=grpo", "--set", "ppo.iterations=4", "--set", "save_iterations=1"]
    log = open(tmp_path / "first.log", "w")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while not (out / "checkpoints" / "iter_002" / "run_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows(out)
    assert len(before) >= 2
    done = run_cli("ppo", "--config", str(repo / "configs" / "ppo_tiny.yaml"), "--set", f"output_dir={out}",
                   "--set", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}", "--set", "ppo.estimator=grpo",
                   "--set", "ppo.iterations=4", "--set", "save_iterations=1", "--set", f"resume_from={out}", timeout=600,
                   env={"RAY_ADDRESS": env["RAY_ADDRESS"]})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    _rises(rows)  # GRPO raises the reward, across the kill
    for key in ("pg_loss", "kl_loss", "clipfrac", "entropy", "gen_s", "score_s", "train_s", "sync_s", "sync_bytes",
                "kl_coef", "truncated", "rows_unused"):
        assert key in rows[-1], key
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "logs", "metrics.jsonl", "model", "reward.png",
                                                      "run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_004"]  # only the last is kept
    # The console log of both runs (the killed one and the resumed one), appended; the consoles were quiet.
    assert len(re.findall(r"^---- \d{4}-", (out / "logs" / "console.log").read_text(), re.M)) == 2
    assert " pid=" not in done.stdout + done.stderr
    resumed_after = int(next(x for x in done.stdout.splitlines() if "resumed after iteration" in x).split()[4])
    assert resumed_after in (2, 3)
    assert rows[:resumed_after] == before[:resumed_after]  # the curve continues; nothing before is rewritten
    steps = [r["optimizer_step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == 4  # optimizer state and step counter restored
    assert (out / "model" / "config.json").is_file()


def test_dead_trainer_ends_the_run_naming_the_checkpoint(ray_session, repo, tmp_path, tiny_llama):
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    from lmflow_ray.align.ppo import run_ppo
    from lmflow_ray.errors import RunInterrupted

    out = tmp_path / "dies"
    cfg = load_config(PPOConfig, repo / "configs" / "ppo_tiny.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
                       "ppo.estimator=grpo", "ppo.iterations=30", "save_iterations=1"])
    flt = [("class_name", "=", "TrainerActor"), ("state", "=", "ALIVE")]
    earlier = {a.actor_id for a in list_actors(address=_session_address(), filters=flt, limit=10000)}

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints" / "iter_001").exists():
            time.sleep(0.2)
        for a in list_actors(address=_session_address(), filters=flt, limit=10000):
            if a.actor_id not in earlier and a.pid:
                os.kill(a.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(RunInterrupted, match=rf"a trainer process died during iteration \d+ .*resume_from={out} "
                                             r"\(last checkpoint: iter_\d\d\d\)"):
        run_ppo(cfg)
    killer.join(timeout=5)


def _session_address() -> str:
    """This session's cluster, named: with another Ray head on the machine (tests' shared head) the state
    API cannot pick one by itself."""
    import ray

    return ray.get_runtime_context().gcs_address
