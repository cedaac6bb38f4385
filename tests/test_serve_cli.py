"""`lmflow-ray serve` and `serve run serve/X.yaml` as a user runs them, on their own Ray head.

Bad serve configs exit 2 with one line before Ray starts. The two server tests share one
private Ray head (free ports; the session's cluster holds the defaults): first
`lmflow-ray serve --model tiny-llama` with an API key in the environment, stopped with
Ctrl-C; then Ray Serve's own `serve run` on a copy of serve/tiny.yaml.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, run_cli

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}


def test_bad_serve_configs_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "lmflow_ray.serve.app:build_app",
                                                      "args": {"models": [{"path": "tiny-llama", "engin": "hf"}]}}]}))
    cases = [
        (["serve"], "give --model"),
        (["serve", "--config", str(bad)], "key 'models.0.engin': unknown key"),
        (["serve", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["serve", "--model", "a=tiny-llama", "--model", "a=tiny-llama"], "model id 'a' is used twice"),
        (["serve", "--model", "/no/such/model"], "/no/such/model"),
        (["serve", "--model", "tiny-llama", "--engine", "vllm", "--draft-model", "tiny-llama"], "draft_model"),
        (["serve", "--model", "tiny-llama", "--adapter", "nodir"], "expected NAME=ADAPTER_DIR"),
    ]
    for args, expected in cases:
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert expected in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.e2e
def test_lmflow_ray_serve_and_serve_run(tmp_path, repo, tiny_llama, shared_head):
    env, gcs, _ = shared_head
    env = {**env, "RAY_ADDRESS": gcs}
    # 1. lmflow-ray serve, with an API key from the environment.
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lmflow_ray", "serve", "--model", "tiny-llama", "--port", str(port)],
                            env={**env, "LMFLOW_RAY_API_KEY": "sekret"}, cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        while "ready in" not in (tmp_path / "serve.log").read_text():
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekret"}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    finally:
        rc = _stop(proc)
    log.seek(0)
    assert rc == 0 and "ready in" in log.read()

    # 2. Ray Serve's CLI on our YAML (with a free port in place of 8000).
    port = free_port()
    cfg = yaml.safe_load((repo / "serve" / "tiny.yaml").read_text())
    cfg["http_options"]["port"] = port
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    serve_bin = str(Path(sys.executable).parent / "serve")
    proc = subprocess.Popen([serve_bin, "run", str(tmp_path / "tiny.yaml")], env=env, cwd=repo,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny-llama"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        _stop(proc)
