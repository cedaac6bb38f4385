"""Write the KubeRay manifests of this folder from the project's own files.

    python deploy/kuberay/build.py          # after changing serve/smollm2_vllm.yaml or the image

rayservice.yaml embeds serve/smollm2_vllm.yaml's applications unchanged as `serveConfigV2`
(the same file `serve run` and `lmflow-ray serve --config` take); rayjob.yaml runs
jobs/finetune.py with configs/sft_smollm2_lora.yaml — the entry point `ray job submit` uses.
Both run the image of ./Dockerfile. tests/test_cluster_config.py checks that the committed
manifests are what this script writes, and that serveConfigV2 passes Ray Serve's deploy schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE = "lmflow-ray:latest"            # FILL: your registry, e.g. ghcr.io/you/lmflow-ray:0.1.0 (./Dockerfile)
RAY_VERSION = "2.60.0"
APP_DIR = "/home/ray/lmflow-ray"       # where the Dockerfile puts this checkout
SERVE_FILE = "serve/smollm2_vllm.yaml"
JOB = ("finetune", "configs/sft_smollm2_lora.yaml")
RUNS = "/mnt/runs"                     # a PersistentVolumeClaim every pod mounts: outputs and checkpoints


def serve_config() -> dict:
    """The serve file as KubeRay submits it: its applications unchanged; the proxy listens on every
    interface of the head pod (the Kubernetes Service in front of it picks the traffic up on 8000)."""
    cfg = yaml.safe_load((ROOT / SERVE_FILE).read_text())
    return {**cfg, "http_options": {**cfg.get("http_options", {}), "host": "0.0.0.0", "port": 8000}}


def _pod(resources: dict, gpu: bool = False, head: bool = False) -> dict:
    limits = {"cpu": resources["cpu"], "memory": resources["memory"], **({"nvidia.com/gpu": 1} if gpu else {})}
    container = {
        "name": "ray-head" if head else "ray-worker", "image": IMAGE,
        "resources": {"limits": limits, "requests": {"cpu": resources["cpu"], "memory": resources["memory"]}},
        "volumeMounts": [{"name": "runs", "mountPath": RUNS}],
    }
    if head:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 8000, "name": "serve"}]
    return {"spec": {"containers": [container],
                     "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "lmflow-runs"}}]}}


def ray_cluster_spec(gpu_workers: int) -> dict:
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {"rayStartParams": {"num-cpus": "2", "dashboard-host": "0.0.0.0"},
                          "template": _pod({"cpu": "4", "memory": "16Gi"}, head=True)},
        "workerGroupSpecs": [
            {"groupName": "cpu-workers", "replicas": 0, "minReplicas": 0, "maxReplicas": 4, "rayStartParams": {},
             "template": _pod({"cpu": "8", "memory": "32Gi"})},
            {"groupName": "gpu-workers", "replicas": 0, "minReplicas": 0, "maxReplicas": gpu_workers,
             "rayStartParams": {}, "template": _pod({"cpu": "8", "memory": "64Gi"}, gpu=True)},
        ],
    }


def rayservice() -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "lmflow-serve"},
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config(), sort_keys=False),
                 "rayClusterConfig": ray_cluster_spec(gpu_workers=2)},
    }


def rayjob() -> dict:
    kind, config = JOB
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "lmflow-finetune"},
        "spec": {
            "entrypoint": f"cd {APP_DIR} && python jobs/{kind}.py --config {config} "
                          f"--set output_dir={RUNS}/sft_smollm2_lora --set scaling.use_gpu=true",
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": ray_cluster_spec(gpu_workers=4),
        },
    }


HEADER = "# Written by deploy/kuberay/build.py from {src}; edit those files and rerun it.\n"


def render() -> dict[str, str]:
    return {
        "rayservice.yaml": HEADER.format(src=SERVE_FILE) + yaml.safe_dump(rayservice(), sort_keys=False),
        "rayjob.yaml": HEADER.format(src=f"jobs/{JOB[0]}.py + {JOB[1]}") + yaml.safe_dump(rayjob(), sort_keys=False),
    }


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}", file=sys.stderr)
