"""Shared fixtures: one Ray cluster and the zoo models per test session.

Starting Ray (~6 s) and building models cost more than most tests, so they are made once.
Tests that start their own Ray head (ray job submit) run in subprocesses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, cwd: Path = REPO):
    import subprocess

    return subprocess.run([sys.executable, "-m", "lmflow_ray", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
