"""Shared fixtures: one Ray cluster and the zoo models per test session.

Starting Ray (~6 s) and building models cost more than most tests, so they are made once.
Tests that start their own Ray head (ray job submit) run in subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by the served app in tests/test_serve.py: set before the session's Ray cluster starts so
# that its workers (the Serve replicas) inherit it, as they inherit a user's exported key.
TEST_API_KEY = "test-key-1234"
os.environ["LMFLOW_RAY_TEST_API_KEY"] = TEST_API_KEY


# Fixtures that make a test end-to-end: the real SmolLM2, or Ray heads and nodes of its own.
E2E_FIXTURES = {"smollm2", "shared_head", "vlm_runs"}


def pytest_collection_modifyitems(items):
    """Every test gets exactly one of unit / ray / e2e (`make test-fast` runs unit and ray)."""
    for item in items:
        if item.get_closest_marker("e2e") or E2E_FIXTURES & set(item.fixturenames):
            if not item.get_closest_marker("e2e"):
                item.add_marker(pytest.mark.e2e)
        elif "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A test marked unit must not start Ray (checked when Ray was not already up before it)."""
    was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if request.node.get_closest_marker("unit") and not was_up and "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "a unit test started Ray: give it the ray_session fixture"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_session():
    from lmflow_ray.runtime import init_ray

    ray = init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from lmflow_ray.models.zoo import fetch_model

    return fetch_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from lmflow_ray.models.zoo import fetch_model

    return fetch_model("smollm2-135m-instruct")


def random_lora(base_model: Path, out: Path, std: float = 0.5) -> Path:
    """A LoRA adapter of `base_model` with random B matrices (so it changes the output), saved with the
    tokenizer as training outputs are."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lmflow_ray.models.loading import load_for_generation

    base, tok = load_for_generation(base_model)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    lora.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class CliResult:
    """What a CLI run left: exit status and the two streams (subprocess.CompletedProcess's names)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def hub_offline(monkeypatch):
    """This machine has no Hugging Face Hub: offline mode makes a download fail at once instead of after
    connection retries. The environment alone is not enough once `huggingface_hub` / `datasets` were
    imported by an earlier test (they read it at import): their flags are set too."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cli(capsys, monkeypatch):
    """`lmflow-ray ARGS` run in this process (`cli.main`), from the repository root: for exit codes and
    one-line errors, without a Python start-up per case. Commands that reach Ray join the session's
    cluster when a test holds `ray_session`. Each entry point keeps one subprocess test (`run_cli`)."""
    from lmflow_ray.cli import main

    monkeypatch.chdir(REPO)
    # Console mode changes process-wide logging (console.py); this shared pytest process keeps its own.
    monkeypatch.setenv("LMFLOW_RAY_VERBOSE", "1")

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, cwd: Path = REPO):
    """`python -m lmflow_ray ARGS` in a fresh process (entry-point smoke tests, runs that are killed)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "lmflow_ray", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_ray_head(num_cpus: int = 8, temp: Path | None = None, resources: dict | None = None,
                     args: tuple[str, ...] = (), extra_env: dict | None = None, port: int | None = None):
    """A separate Ray head on free ports for CLI tests (`ray job submit`, `serve run`).

    Yields (env, gcs_address, dashboard_url). Every port is free-picked: the session's own
    cluster already holds the defaults (e.g. the dashboard agent's 52365), and a clash leaves
    the new head without an agent. Ray 2.60 clusters use token auth: with RAY_AUTH_MODE=token
    clients read ~/.ray/auth_token (made by `ray start` when missing).
    """
    import json
    import tempfile

    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port, dash = port or free_port(), free_port()
    # Short path: Ray's unix sockets live under the temp dir (107-character limit). `ray start` writes its
    # address file there (ray_current_cluster), where `RAY_TMPDIR=<its parent>` clients look for it.
    temp = temp or Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    ray_start(["--head", f"--port={port}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", *([f"--resources={json.dumps(resources)}"] if resources else []), *args],
              temp, {**env, **(extra_env or {})})
    try:
        yield env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    finally:
        stop_head(temp)


@pytest.fixture(scope="session")
def shared_head():
    """One private Ray head for every test that runs commands against a `ray start` cluster, and for the
    two-node tests (test_multinode.py joins a second raylet to it). 8 CPUs; custom resources
    `trainer_node` (the two-node GRPO run's trainers) and one `slot` (one training worker or replica per
    node in the node-loss tests). Yields (env, gcs_address, dashboard_url); in `env`, RAY_TMPDIR points
    where its address file lies, as `ray start` leaves it for a user's later commands."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    # Ray Train waits this long for workers on resources it still counts after their node died (default 60 s);
    # the GCS marks a node that stopped answering (a lost machine: test_multinode.py kills one) dead after
    # 3 missed 1 s health checks (default 5 x 3 s).
    fast = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with private_ray_head(num_cpus=8, temp=root / "ray", resources={"trainer_node": 4, "slot": 1},
                          extra_env=fast) as (env, gcs, dash):
        yield {**env, "RAY_TMPDIR": str(root)}, gcs, dash


_AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "node-manager-port", "object-manager-port")


def ray_start(args: list[str], temp: Path, env: dict, attempts: int = 3) -> None:
    """`ray start ARGS` with its own temp dir and every agent port free-picked.

    A port picked free can be taken before Ray binds it (the OS hands the same ephemeral range to
    outgoing connections, and Ray's processes open many), so a failed start is cleaned up and
    retried on new ports; the last failure is raised with Ray's own output.
    """
    import subprocess

    ray_bin = str(Path(sys.executable).parent / "ray")
    for _ in range(attempts):
        names = _AGENT_PORTS + (("ray-client-server-port",) if "--head" in args else ())
        ports = [f"--{name}={free_port()}" for name in names]
        cmd = [ray_bin, "start", f"--temp-dir={temp}", "--disable-usage-stats", *ports, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            return
        stop_head(temp)
    raise RuntimeError(f"`ray start` failed {attempts} times; last output:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def stop_head(temp: Path, abrupt: bool = False) -> None:
    """Stop only the head (or node) started above (`ray stop` would also kill the session's cluster).
    `abrupt`: SIGKILL at once, as a machine that is lost (a stopping raylet first ends its workers
    in order, which a short run can outlast)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    for p in list(procs):  # with their children: the raylet's agents retitle themselves (ray::DashboardAgent)
        try:
            procs += [c for c in p.children(recursive=True) if c not in procs]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill() if abrupt else p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)  # Ray's processes that ignore SIGTERM are killed after
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


SFT = "examples/data/sft_tiny.json"


def make_cfg(repo: Path, out: Path, data: str = SFT, **sets):
    """The finetune tests' config: tiny-llama SFT, 2 workers, ZeRO-2, 16 steps (one epoch), checkpoints every 8."""
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config

    base = {
        "model": "tiny-llama",
        "data": {"path": str(repo / data), "max_length": 128},
        "output_dir": str(out),
        "deepspeed": "zero2",
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "train": {"num_epochs": 1, "micro_batch_size": 8, "global_batch_size": 16, "lr": 3e-3,
                  "warmup_ratio": 0.1, "save_steps": 8},
    }
    return load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in sets.items()], base=base)


@pytest.fixture(scope="session")
def reference_zero2(ray_session, repo, tmp_path_factory, tiny_llama):
    """An uninterrupted 2-worker ZeRO-2 SFT run (16 steps), the baseline for resume and failure tests."""
    from lmflow_ray.train.run import run_finetune

    out = tmp_path_factory.mktemp("ref") / "out"
    run_finetune(make_cfg(repo, out))
    return out


@pytest.fixture(scope="session")
def vlm_runs(ray_session, repo, tmp_path_factory, tiny_llama):
    """LLaVA-style two-stage tuning on synthetic shapes (examples/make_shapes.py: 240 training images,
    48 held out): stage 1 (configs/vlm_stage1.yaml: projector only, on captions), then stage 2
    (configs/vlm_stage2.yaml: projector + LM, on questions). Returns {"data", "stage1", "stage2"} dirs."""
    import importlib.util

    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune

    root = tmp_path_factory.mktemp("vlm")
    spec = importlib.util.spec_from_file_location("make_shapes", repo / "examples" / "make_shapes.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    files = shapes.make(root / "data", n=240, heldout=48, seed=1)
    s1, s2 = root / "stage1", root / "stage2"
    run_finetune(load_config(FinetuneConfig, repo / "configs" / "vlm_stage1.yaml",
                             [f"output_dir={s1}", f"data.path={files['captions']}", "train.num_epochs=1"]))
    run_finetune(load_config(FinetuneConfig, repo / "configs" / "vlm_stage2.yaml",
                             [f"model={s1}", f"output_dir={s2}", f"data.path={files['instructions']}",
                              "train.num_epochs=4", "train.micro_batch_size=8"]))
    return {"data": root / "data", "stage1": s1, "stage2": s2, "heldout": files["heldout"]}
