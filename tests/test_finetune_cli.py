"""`lmflow-ray finetune` from the command line: bad configs fail fast.

Bad configs must exit 2 with one `error:` line naming the problem, before any Ray worker
starts (these runs take seconds because Ray is never started). Jobs through `ray job submit`:
tests/test_jobs.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

BASE = {
    "model": "tiny-llama",
    "data": {"path": "examples/data/sft_tiny.json", "max_length": 64},
    "output_dir": "OUT",
    "train": {"num_epochs": 1, "micro_batch_size": 4},
}


def write_cfg(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    cfg = json.loads(json.dumps(cfg).replace('"OUT"', json.dumps(str(tmp_path / "out"))))
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["train.lrr=1"], "key 'train.lrr': unknown key"),
        (["train.lr=fast"], "key 'train.lr': Input should be a valid number"),
        (["data.path=examples/data/missing.json"], "dataset not found: examples/data/missing.json"),
        (["model=no-such-model"], "model not found: 'no-such-model'"),
        (["lora.enabled=true", "lora.qlora=true"], "lora.qlora needs CUDA GPUs"),
        (["train.global_batch_size=6", "scaling.num_workers=2"], "not divisible by micro_batch_size (4) x num_workers (2)"),
        (["lisa.enabled=true", "deepspeed=zero3"], "lisa.enabled needs deepspeed: zero0"),
        (["deepspeed=zero9"], "deepspeed: 'zero9' is neither"),
        (["data.template=vicuna"], "unknown template 'vicuna'"),
        (["lora.enabled=true", "lora.target_modules=[nope_proj]"], "lora.target_modules ['nope_proj'] not found"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, repo, tiny_llama, sets, expected, cli):
    cfg = write_cfg(tmp_path, BASE)
    args = ["finetune", "--config", str(cfg)]
    for s in sets:
        args += ["--set", s]
    start = time.time()
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 60  # failed before any Ray worker started


def test_existing_output_dir_is_not_overwritten(tmp_path, repo, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"keep": true}')
    proc = run_cli("finetune", "--config", str(write_cfg(tmp_path, BASE)))
    assert proc.returncode == 2 and "is not empty; choose a new or empty output_dir (or set resume_from" in proc.stderr
    assert (out / "run.json").read_text() == '{"keep": true}'


def test_config_file_errors(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-llama\ndata: [unclosed\n")
    proc = cli("finetune", "--config", str(bad))
    assert proc.returncode == 2 and f"{bad}:" in proc.stderr and "invalid YAML" in proc.stderr
    proc = cli("finetune", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_storage_path_that_no_filesystem_opens(tmp_path, tiny_llama, cli):
    proc = cli("finetune", "--config", str(write_cfg(tmp_path, BASE)), "--set", "storage_path=nosuch://bucket/x")
    assert proc.returncode == 2 and proc.stderr.startswith("error: storage_path: nosuch://bucket/x is not a storage URI")
    assert not (tmp_path / "out").exists()
