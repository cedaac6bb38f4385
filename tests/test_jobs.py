"""Every job kind has one `jobs/` entry point; the light kinds run through the Jobs HTTP API.

The jobs go to the session's private `ray start` head (conftest.shared_head) with
`JobSubmissionClient` — the API `ray job submit` and KubeRay's RayJob call — each with the
checkout as its working_dir, all at once as a team's queue would hold them. A bad config ends
FAILED with the CLI's one-line error in the job's logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmflow_ray.cli import JOB_KINDS

REPO = Path(__file__).resolve().parents[1]


def test_one_entry_point_per_job_kind():
    files = {p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_")}
    assert files == {k.replace("-", "_") for k in JOB_KINDS}
    for kind in JOB_KINDS:
        assert f'run("{kind}")' in (REPO / "jobs" / f"{kind.replace('-', '_')}.py").read_text()


# Runs in a subprocess with the head's environment: Ray clients read the cluster's auth mode
# (RAY_AUTH_MODE=token) when the process starts, and this test process belongs to another cluster.
SUBMIT = r"""
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

address, jobs, runtime_env = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
deadline = time.time() + 300
while True:  # the head's job agent takes seconds (a minute on a loaded machine) to come up
    try:
        client = JobSubmissionClient(address)
        ids = {name: client.submit_job(entrypoint=entry, runtime_env=runtime_env) for name, entry in jobs.items()}
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(2)
deadline = time.time() + 900
ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
while not all(client.get_job_status(j) in ended for j in ids.values()) and time.time() < deadline:
    time.sleep(1)
print(json.dumps({name: {"status": str(client.get_job_status(j)), "logs": client.get_job_logs(j)}
                  for name, j in ids.items()}))
"""


def submit_and_wait(env: dict, dashboard: str, jobs: dict[str, str], runtime_env: dict) -> dict:
    """Submit the jobs at once, wait for all to end: {name: {"status", "logs"}}."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SUBMIT, dashboard, json.dumps(jobs), json.dumps(runtime_env)],
                          env=env, capture_output=True, text=True, timeout=1300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_light_job_kinds_through_the_jobs_api(tmp_path, tiny_llama, shared_head):
    env, _, dashboard = shared_head
    out = tmp_path
    data = "examples/data"
    short = ["--set", "train.num_epochs=1", "--set", "train.max_steps=2", "--set", "train.eval_steps=0",
             "--set", "scaling.num_workers=1"]  # two trainings at once on 2 cores: one worker each
    # jobs/finetune.py runs through the same API in test_autoscaling.py (and refuses a bad config here).
    jobs = {
        "reward-model": ["jobs/reward_model.py", "--config", "configs/rm_tiny.yaml", "--set", f"output_dir={out}/rm",
                         *short],
        "dpo": ["jobs/dpo.py", "--config", "configs/dpo_tiny.yaml", "--set", f"output_dir={out}/dpo", *short, "--verbose"],
        "eval": ["jobs/eval.py", "--model", "tiny-llama", "--data", f"{data}/raft_prompts_tiny.json",
                 "--metrics", "length,distinct", "--max-tokens", "8", "--out", f"{out}/eval.json"],
        "infer": ["jobs/infer.py", "--model", "tiny-llama", "--data", f"{data}/raft_prompts_tiny.json",
                  "--max-tokens", "8", "--out", f"{out}/answers.json"],
        "bad-config": ["jobs/finetune.py", "--config", "configs/sft_tiny_zero3.yaml", "--set", f"output_dir={out}/bad",
                       "--set", "train.max_steps=-3"],
    }
    runtime_env = {"working_dir": str(REPO), "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    ended = submit_and_wait(env, dashboard, {name: "python " + " ".join(args) for name, args in jobs.items()},
                            runtime_env)
    logs = {name: e["logs"] for name, e in ended.items()}
    for name in jobs:
        expected = "FAILED" if name == "bad-config" else "SUCCEEDED"
        assert ended[name]["status"] == expected, f"{name}: {ended[name]['status']}\n{logs[name][-3000:]}"

    for run in ("rm", "dpo"):
        assert (out / run / "model" / "model.safetensors").exists(), run
        assert json.loads((out / run / "run.json").read_text())["final"]["step"] == 2, run
    report = json.loads((out / "eval.json").read_text())
    assert report["metrics"]["length"] > 0, report["metrics"]
    answers = json.loads((out / "answers.json").read_text())
    assert answers["type"] == "text2text" and len(answers["instances"]) > 0

    # Quiet by default: our progress lines in the job's log, Ray's and the workers' in OUT/logs/console.log;
    # --verbose puts them back on the console.
    assert "[lmflow-ray] step 2/2" in logs["reward-model"] and "RayTrainWorker pid=" not in logs["reward-model"]
    assert "(TrainController pid=" in (out / "rm" / "logs" / "console.log").read_text()
    assert "(RayTrainWorker pid=" in logs["dpo"] and not (out / "dpo" / "logs").exists()

    errors = [line for line in logs["bad-config"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.max_steps" in errors[0] and ">= 1" in errors[0], logs["bad-config"]
    assert "Traceback" not in logs["bad-config"]
    assert not (out / "bad").exists()
