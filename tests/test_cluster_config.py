"""The cluster files users deploy with: cluster.yaml (`ray up`), serve/*.yaml, deploy/kuberay/.

Each is checked with the validator of the tool that will read it — Ray's autoscaler schema,
Ray Serve's deploy schema — so a typo fails here, not on a cloud bill.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    validate_config(prepare_config(copy.deepcopy(cfg)))  # as `ray up` checks it: after merging Ray's defaults
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert {"cpu_workers", "gpu_workers"} <= set(workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())  # autoscaling from 0
    assert "'.[gpu]'" in " ".join(workers["gpu_workers"]["worker_setup_commands"])
    assert "'.[cpu]'" in " ".join(workers["cpu_workers"]["worker_setup_commands"])
    assert cfg["file_mounts"]["~/lmflow-ray"] == "."


@pytest.mark.parametrize("typo", [("available_node_types", "cpu_workers", "min_worker"), ("idle_timeout_minute",)])
def test_a_typo_in_cluster_yaml_fails_the_schema(typo):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    node = cfg
    for key in typo[:-1]:
        node = node[key]
    node[typo[-1]] = 1
    with pytest.raises(jsonschema.ValidationError, match=typo[-1]):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "serve").glob("*.yaml")))
def test_serve_configs_pass_serves_deploy_schema(name):
    from ray.serve.schema import ServeDeploySchema

    from lmflow_ray.serve.config import parse_serve_config

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / name).read_text()))
    for app in cfg.applications:
        assert app.import_path == "lmflow_ray.serve.app:build_app"
        parse_serve_config(dict(app.args))  # the app's own arguments, as build_app reads them


def _build():
    spec = importlib.util.spec_from_file_location("kuberay_build", REPO / "deploy" / "kuberay" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kuberay_manifests_are_built_from_the_project_files():
    from ray.serve.schema import ServeDeploySchema

    build = _build()
    for name, text in build.render().items():
        assert (REPO / "deploy" / "kuberay" / name).read_text() == text, f"rerun python deploy/kuberay/build.py ({name})"

    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    source = yaml.safe_load((REPO / build.SERVE_FILE).read_text())
    assert serve_cfg["applications"] == source["applications"]

    job = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"]
    script, config = entry.split("python ")[1].split()[:3:2]
    assert (REPO / script).exists() and (REPO / config).exists(), entry
    for spec in (service["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == __import__("ray").__version__
        assert all(g["minReplicas"] == 0 for g in spec["workerGroupSpecs"])
