"""Two Ray nodes on this machine: GRPO with its generation actors on node 2 and its trainer on node 1.

A private head (node 1, custom resource `trainer_node`) and a second raylet joined to it with
`ray start --address` (its own temp dir, custom resource `rollout_node`) form the cluster; the job
runs as a user runs it, `lmflow-ray ppo` with RAY_ADDRESS. The weights reach node 2 through Ray's
object store: while the run goes, nothing appears under OUT but metrics.jsonl.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, stop_head

pytestmark = pytest.mark.slow


def test_grpo_across_two_nodes(repo, tmp_path, tiny_llama, shared_head):
    env, gcs, _ = shared_head
    ray_bin = str(Path(sys.executable).parent / "ray")
    node2 = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port")]
    subprocess.run([ray_bin, "start", f"--address={gcs}", "--num-cpus=3", f"--temp-dir={node2}",
                    '--resources={"rollout_node": 2}', "--disable-usage-stats", *ports],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        _run_and_check(repo, tmp_path, {**env, "RAY_ADDRESS": gcs}, gcs)
    finally:
        stop_head(node2)


def _run_and_check(repo, tmp_path, env, gcs):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lmflow_ray", "ppo", "--config", str(repo / "configs" / "ppo_tiny.yaml"),
            "--set", f"output_dir={out}", "--set", f"data.path={repo / 'examples/data/raft_prompts_tiny.json'}",
            "--set", "ppo.estimator=grpo", "--set", "ppo.iterations=4",
            "--set", "generation.resources={rollout_node: 1}", "--set", "scaling.resources={trainer_node: 1}"]
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: set[str] = set()
    deadline = time.time() + 600
    while proc.poll() is None:
        assert time.time() < deadline, "the two-node run did not finish in 600 s"
        files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} if out.exists() else set()
        if "run.json" not in files and not any(f.startswith("model/") for f in files):
            seen |= files  # the run has not started writing its final outputs
        time.sleep(0.2)
    log.seek(0)
    text = log.read()
    assert proc.returncode == 0, text[-4000:]
    assert seen <= {"metrics.jsonl"}, seen  # weights moved through Ray, not through OUT

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rewards[-1] > rewards[0], rewards
    assert all(r["sync_transport"] == "ray-object-store" for r in rows)

    placement = json.loads((out / "run.json").read_text())["placement"]
    nodes = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
         "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))", gcs],
        env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip().splitlines()[-1])
    assert len(nodes) == 2, nodes
    rollout = next(n for n, res in nodes.items() if "rollout_node" in res)
    assert set(placement["generation"]) == {rollout}
    assert rollout not in placement["trainer"]
