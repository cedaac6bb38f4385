"""An autoscaling Ray cluster on this machine: Ray's real autoscaler with its fake multi-node provider.

The provider starts real raylets on this machine as the "cloud's" nodes. The node types mirror
cluster.yaml's groups (`cpu_workers`, `gpu_workers`, both from 0); the head advertises no CPUs,
so it cannot hold the work alone. Through the Jobs API a 2-worker finetune is submitted; the
autoscaler adds CPU worker nodes, the job SUCCEEDS with a complete output dir, and after the
idle timeout the nodes are removed. Then a Serve app with `autoscaling: {min_replicas: 1,
max_replicas: 2}` takes a bounded burst of requests on 127.0.0.1 (until Serve added a replica
on a node the autoscaler added): afterwards both scale back down; no request fails but documented 503 refusals.
The node count over time is printed (pytest -s shows it; a failure shows it too).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import free_port, private_ray_head

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def autoscaling_config(gcs_address: str) -> dict:
    """cluster.yaml's node types on Ray's fake provider: CPU-only machines of 2 CPUs; the GPU
    group keeps its place (no job here asks for a GPU, so it must stay at 0 nodes)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE as head  # the provider's

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert {"cpu_workers", "gpu_workers"} <= set(cluster["available_node_types"])
    return {
        "cluster_name": "lmflow-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            head: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_workers": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3},
            "gpu_workers": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": head, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# The driver runs in a subprocess with the head's environment (token auth, RAY_ADDRESS).
DRIVER = r"""
import json, sys, threading, time, urllib.request, urllib.error
import ray
from ray.job_submission import JobStatus, JobSubmissionClient

gcs, dashboard, out, serve_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ray.init(address=gcs, logging_level="ERROR")
t0 = time.time()
timeline = []

def nodes():
    alive = [n for n in ray.nodes() if n["Alive"]]
    workers = [n for n in alive if n["Resources"].get("CPU", 0) > 0]
    return len(workers), sum(1 for n in workers if n["Resources"].get("GPU", 0) > 0)

def record(phase, **extra):
    cpu_nodes, gpu_nodes = nodes()
    row = {"t": round(time.time() - t0, 1), "phase": phase, "worker_nodes": cpu_nodes, "gpu_nodes": gpu_nodes, **extra}
    timeline.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row

def wait_scaled_down(phase, keep=0, limit=150):
    end = time.time() + limit
    while time.time() < end:
        if record(phase)["worker_nodes"] <= keep:
            return True
        time.sleep(2)
    return False

# 1. A 2-worker finetune through the Jobs API.
entry = ("python jobs/finetune.py --config configs/sft_tiny_zero3.yaml --set output_dir=" + out
         + " --set deepspeed=zero0 --set train.num_epochs=1 --set train.max_steps=1 --set scaling.num_workers=2"
         + " --set scaling.cpus_per_worker=1")
deadline = time.time() + 300
while True:  # the job agent takes a few seconds after `ray start`
    try:
        client = JobSubmissionClient(dashboard)
        job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": ".", "excludes": ["tests", "benchmarks"]})
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(2)
ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
end = time.time() + 600
while client.get_job_status(job) not in ended and time.time() < end:
    record("finetune")
    time.sleep(2)
status = str(client.get_job_status(job))
logs = client.get_job_logs(job)
down = wait_scaled_down("idle after finetune")

# 2. Serve: replicas between 1 and 2, each a whole 2-CPU node (so a second replica needs a node the
# autoscaler adds; a third would only be started and stopped again), a bounded burst of requests.
from ray import serve
from lmflow_ray.serve.app import build_app

serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
args = {"models": [{"name": "tiny", "path": "tiny-llama", "num_cpus": 2, "max_batch_size": 2, "max_tokens_limit": 64,
                    "max_ongoing_requests": 2, "max_queued_requests": 64,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                    "upscale_delay_s": 0, "downscale_delay_s": 3,
                                    "look_back_period_s": 3}}]}
serve.run(build_app(args), name="lmflow", route_prefix="/")

def replicas():
    app = serve.status().applications["lmflow"]
    dep = next(d for name, d in app.deployments.items() if name != "OpenAIIngress")
    return dep.replica_states.get("RUNNING", 0)

codes = {}
lock = threading.Lock()
stop = threading.Event()

def outcome(code, sent):
    with lock:
        codes[str(code)] = codes.get(str(code), 0) + 1

sys.path.insert(0, "tests")
from load_clients import start_clients
threads = start_clients(serve_port, 8, 48, outcome, stop)
peak_replicas = 0
end = time.time() + 150  # bounded: until Serve added a replica on a node the autoscaler added, or 150 s
while time.time() < end:
    n = replicas()
    peak_replicas = max(peak_replicas, n)
    row = record("burst", replicas=n)
    if n >= 2 and row["worker_nodes"] >= 2:
        break
    time.sleep(1)
stop.set()
for th in threads:
    th.join()
end = time.time() + 120
while time.time() < end and replicas() > 1:
    record("after burst", replicas=replicas())
    time.sleep(2)
final_replicas = replicas()
serve_down = wait_scaled_down("idle after burst", keep=1)
print(json.dumps({"status": status, "logs": logs[-4000:], "scaled_down": down, "codes": codes,
                  "peak_replicas": peak_replicas, "final_replicas": final_replicas, "serve_scaled_down": serve_down,
                  "timeline": timeline}))
serve.shutdown()
"""


def test_autoscaling_cluster_runs_a_job_and_a_serve_burst(tmp_path, tiny_llama):
    from ray._private.services import get_node_ip_address

    root = Path(tempfile.mkdtemp(prefix="ra", dir="/tmp"))
    port = free_port()
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(f"{get_node_ip_address()}:{port}")))
    # Serve keeps an idle node's HTTP proxy for RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S (30 s) before the
    # node can go idle; 2 s here so the scale-down after the burst is not 50 s of waiting.
    fast = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "2"}
    with private_ray_head(num_cpus=0, temp=root / "ray", port=port, args=(f"--autoscaling-config={config}",),
                          extra_env=fast) as (env, gcs, dash):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-c", DRIVER, gcs, dash, str(out), str(free_port())],
                              env={**env, **fast}, cwd=REPO, capture_output=True, text=True,
                              timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"status"')))
    timeline = result["timeline"]
    print("\nnode count over time:\n" + "\n".join(json.dumps(r) for r in timeline))
    assert result["status"] == "SUCCEEDED", result["logs"]
    for name in ("model/config.json", "model/model.safetensors", "metrics.jsonl", "run.json"):
        assert (out / name).exists(), name
    finetune = [r["worker_nodes"] for r in timeline if r["phase"] == "finetune"]
    assert finetune[0] == 0 and max(finetune) >= 1, timeline  # nodes were added for the job
    assert result["scaled_down"], timeline  # ... and removed after the idle timeout
    assert all(r["gpu_nodes"] == 0 for r in timeline)  # nothing asked for a GPU

    burst = [r for r in timeline if r["phase"] == "burst"]
    assert result["peak_replicas"] >= 2, timeline
    assert max(r["worker_nodes"] for r in burst) > min(r["worker_nodes"] for r in burst), timeline
    assert result["final_replicas"] == 1 and result["serve_scaled_down"], timeline
    codes = result["codes"]
    assert codes.get("200", 0) > 0 and set(codes) <= {"200", "503"}, codes
