"""Bad inputs a new user hits: each is one `error:` line and exit 2, with nothing written or started.

Run in-process through `cli.main` (no interpreter start per case); the Ray-address cases need
their own processes because they are about how a process finds (or ignores) a cluster.
HTTP-side bad requests (content types, logprobs ranges, strict booleans) are in test_serve.py,
against the running server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import random_lora

from lmflow_ray.cli import main


def run(capsys, *argv: str) -> str:
    """Run the CLI in this process; assert exit 2 with one clean error line; return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2, (argv, code, err[-3000:])
    assert lines and "Traceback" not in err, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. numeric ranges


@pytest.mark.parametrize("command, config, key_value, expected", [
    ("finetune", "sft_tiny_zero3", "train.max_steps=-3", "key 'train.max_steps': must be >= 1 (got -3)"),
    ("finetune", "sft_tiny_zero3", "train.max_steps=0", "key 'train.max_steps': must be >= 1"),
    ("finetune", "sft_tiny_zero3", "train.warmup_ratio=1.5", "key 'train.warmup_ratio': must be < 1"),
    ("finetune", "sft_tiny_zero3", "train.save_steps=-1", "key 'train.save_steps': must be >= 0"),
    ("finetune", "sft_tiny_zero3", "lora.r=0", "key 'lora.r': must be >= 1"),
    ("finetune", "sft_tiny_zero3", "scaling.cpus_per_worker=0", "key 'scaling.cpus_per_worker': must be > 0"),
    ("finetune", "sft_tiny_zero3", "output_dir=", "key 'output_dir': must not be empty"),
    ("reward-model", "rm_tiny", "train.micro_batch_size=0", "key 'train.micro_batch_size': must be >= 1"),
    ("dpo", "dpo_tiny", "dpo.beta=-1", "key 'dpo.beta': must be > 0"),
    ("raft", "raft_tiny", "raft.iterations=-2", "key 'raft.iterations': must be >= 1"),
    ("raft", "raft_tiny", "generation.max_tokens=0", "key 'generation.max_tokens': must be >= 1"),
    ("ppo", "ppo_tiny", "generation.top_p=0", "key 'generation.top_p': must be > 0"),
    ("ppo", "ppo_tiny", "ppo.kl_horizon=0", "key 'ppo.kl_horizon': must be >= 1"),
    ("ppo", "ppo_tiny", "ppo.time_budget_s=-5", "key 'ppo.time_budget_s': must be > 0"),
])
def test_out_of_range_numbers_refused_at_config_time(capsys, tmp_path, repo, command, config, key_value, expected):
    out = tmp_path / "out"
    line = run(capsys, command, "--config", str(repo / "configs" / f"{config}.yaml"),
               "--set", f"output_dir={out}", "--set", key_value)
    assert expected in line
    assert not out.exists()  # nothing written


def test_serve_config_ranges():
    from lmflow_ray.errors import UserError
    from lmflow_ray.serve.config import parse_serve_config

    for bad, key in [({"kv_cache_gb": 0}, "models.0.kv_cache_gb"), ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s"),
                     ({"autoscaling": {"target_ongoing_requests": 0}}, "target_ongoing_requests")]:
        with pytest.raises(UserError, match=key):
            parse_serve_config({"models": [{"path": "tiny-llama", **bad}]})


# ----------------------------------------------------------------------------- 2, 6, 7. serve refuses before deploying


def test_serve_refuses_a_port_in_use(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = run(capsys, "serve", "--model", "tiny-llama", "--port", str(port))
    assert f"port {port} on 127.0.0.1 is already in use" in line


@pytest.mark.parametrize("args, expected", [
    (["--port", "-5"], "port -5 is not a port number 1-65535"),
    (["--port", "70000"], "port 70000 is not a port number"),
    (["--host", "no.such.host.invalid", "--port", "20001"], "--host no.such.host.invalid: not a known host"),
    (["--host", "10.255.255.1", "--port", "20001"], "--host 10.255.255.1 is not an address of this machine"),
])
def test_serve_validates_host_and_port(capsys, args, expected):
    assert expected in run(capsys, "serve", "--model", "tiny-llama", *args)


def test_serve_refuses_adapter_without_config_before_deploying(capsys, tmp_path, tiny_llama):
    plain = tmp_path / "not-an-adapter"
    plain.mkdir()
    (plain / "notes.txt").write_text("no adapter here")
    line = run(capsys, "serve", "--model", "tiny-llama", "--adapter", f"x={plain}", "--port", str(_free_port()))
    assert "adapter 'x'" in line and "no adapter_config.json" in line and str(plain) in line


# ----------------------------------------------------------------------------- 3, 4. vLLM: options and models it cannot run


def test_vllm_refuses_draft_model_in_one_line(capsys, tmp_path, smollm2):
    line = run(capsys, "infer", "--model", "smollm2-135m-instruct", "--engine", "vllm", "--draft-model", "tiny-llama",
               "--data", "examples/data/kv2json_heldout.json", "--out", str(tmp_path / "a.json"))
    assert "--draft-model (speculative decoding) is an option of the hf engine" in line
    assert not (tmp_path / "a.json").exists()


def test_vllm_refuses_unsupported_head_size_everywhere(capsys, tmp_path, repo, tiny_llama):
    expected = "attention head size 16 is not supported by vLLM on CPU"
    line = run(capsys, "infer", "--model", "tiny-llama", "--engine", "vllm",
               "--data", "examples/data/kv2json_heldout.json", "--out", str(tmp_path / "a.json"))
    assert expected in line and "--engine hf" in line
    assert expected in run(capsys, "infer", "--model", "tiny-llama", "--engine", "vllm", "--workers", "1",
                           "--data", "examples/data/kv2json_heldout.json", "--out", str(tmp_path / "b.json"))
    assert expected in run(capsys, "serve", "--model", "tiny-llama", "--engine", "vllm", "--port", str(_free_port()))
    out = tmp_path / "raft"
    assert expected in run(capsys, "raft", "--config", str(repo / "configs" / "raft_tiny.yaml"),
                           "--set", f"output_dir={out}", "--set", "generation.engine=vllm")
    assert not out.exists()


# ----------------------------------------------------------------------------- 5. merge-lora on the wrong base


def test_merge_lora_names_base_and_adapter_on_mismatch(capsys, tmp_path, tiny_llama, smollm2):
    adapter = random_lora(tiny_llama, tmp_path / "tiny-lora")
    line = run(capsys, "merge-lora", "--base", "smollm2-135m-instruct", "--adapter", str(adapter),
               "--out", str(tmp_path / "merged"))
    assert f"adapter {adapter} does not fit base model smollm2-135m-instruct" in line
    assert str(tiny_llama) in line  # where it was trained
    assert not (tmp_path / "merged").exists()
    assert "no adapter_config.json" in run(capsys, "merge-lora", "--base", "tiny-llama", "--adapter", str(tmp_path),
                                           "--out", str(tmp_path / "merged"))


# ----------------------------------------------------------------------------- the smaller ones


def test_eval_metrics_and_model_checked_first(capsys, tmp_path, tiny_llama):
    data = "examples/data/kv2json_heldout.json"
    assert "--metrics is empty" in run(capsys, "eval", "--model", "tiny-llama", "--data", data, "--metrics", "",
                                       "--out", str(tmp_path / "r.json"))
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    line = run(capsys, "eval", "--model", str(a_file), "--data", data, "--out", str(tmp_path / "r.json"))
    assert "model not found" in line and str(a_file) in line  # not "--metrics reward needs --reward"
    assert not (tmp_path / "r.json").exists()
    assert "--batch-size must be >= 1" in run(capsys, "eval", "--model", "tiny-llama", "--data", data,
                                              "--batch-size", "0", "--out", str(tmp_path / "r.json"))


def test_config_that_is_a_directory(capsys, tmp_path):
    assert f"--config {tmp_path} is a directory" in run(capsys, "finetune", "--config", str(tmp_path))


def test_infer_workers_help_and_behaviour_agree(capsys, tmp_path):
    from lmflow_ray.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["infer"]
    help_text = next(a.help for a in sub._actions if "--workers" in a.option_strings)
    assert "0 (default)" in help_text and "N >= 1" in help_text
    assert "--workers must be >= 0" in run(capsys, "infer", "--model", "tiny-llama", "--workers", "-1",
                                           "--data", "examples/data/kv2json_heldout.json", "--out", str(tmp_path / "o.json"))


# ----------------------------------------------------------------------------- 10. which Ray cluster a command uses

PROBE = ("from lmflow_ray.runtime import init_ray; ray = init_ray(); "
         "print('GCS', ray.get_runtime_context().gcs_address, int(ray.cluster_resources()['CPU']))")


def _probe(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in env.items() if k != "RAY_ADDRESS" or v})


def test_stale_ray_address_file_is_ignored():
    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")  # nothing listens there
    proc = _probe({**os.environ, "RAY_TMPDIR": str(root), "RAY_ADDRESS": "", "LMFLOW_RAY_NUM_CPUS": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "3"  # its own local cluster, with the CPUs we asked for
    assert "num_cpus and num_gpus must not be provided" not in proc.stderr and "note:" not in proc.stderr


@pytest.mark.e2e
def test_live_ray_start_head_is_named_not_joined_silently(shared_head):
    env, gcs, _ = shared_head
    env = {**env, "LMFLOW_RAY_NUM_CPUS": "3"}
    own = _probe({**env, "RAY_ADDRESS": ""})
    assert own.returncode == 0, own.stderr[-3000:]
    port = gcs.rsplit(":", 1)[1]  # the address file names the node's IP, not 127.0.0.1
    assert "a Ray cluster started by `ray start` runs on this machine" in own.stderr
    assert f":{port}); this command starts its own" in own.stderr
    assert f":{port} " not in own.stdout and own.stdout.split()[-1] == "3"
    joined = _probe({**env, "RAY_ADDRESS": "auto"})
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert f":{port} " in joined.stdout and "note:" not in joined.stderr  # joined that head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_from_a_run_of_another_job_kind_is_refused(cli, reference_zero2, tmp_path):
    """A finished finetune run resumed by `dpo`, and an RL run resumed by `finetune`: one line each,
    exit 2, nothing written."""
    result = cli("dpo", "--config", "configs/dpo_tiny.yaml", "--set", f"output_dir={tmp_path / 'dpo'}",
                 "--set", f"resume_from={reference_zero2}")
    assert result.returncode == 2, result.stderr
    assert f"resume_from {reference_zero2}: that is a finetune run; `lmflow-ray dpo` resumes only its own" in result.stderr
    rl = tmp_path / "raft_out"
    (rl / "checkpoints" / "iter_002").mkdir(parents=True)
    result = cli("finetune", "--config", "configs/sft_tiny_zero3.yaml", "--set", f"output_dir={rl}",
                 "--set", f"resume_from={rl}")
    assert result.returncode == 2 and "that is an RL run (RAFT / PPO / iterative DPO)" in result.stderr, result.stderr
    assert not (tmp_path / "dpo").exists() and sorted(p.name for p in rl.iterdir()) == ["checkpoints"]


JOB_CONFIGS = {"finetune": "configs/sft_tiny_zero3.yaml", "reward-model": "configs/rm_tiny.yaml",
               "dpo": "configs/dpo_tiny.yaml", "raft": "configs/raft_tiny.yaml", "ppo": "configs/ppo_tiny.yaml",
               "iterative-dpo": "configs/iterative_dpo_tiny.yaml"}


@pytest.mark.parametrize("command", sorted(JOB_CONFIGS))
def test_every_job_takes_an_empty_output_dir_and_refuses_a_non_empty_one(cli, tmp_path, tiny_llama, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    # An empty directory passes the check: the run goes on to the next one (here a model that does not exist).
    result = cli(command, "--config", JOB_CONFIGS[command], "--set", f"output_dir={empty}", "--set", "model=no-such-model")
    assert result.returncode == 2 and "model not found: 'no-such-model'" in result.stderr, result.stderr
    assert not any(empty.iterdir())
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    result = cli(command, "--config", JOB_CONFIGS[command], "--set", f"output_dir={used}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"output_dir {used} is not empty; choose a new or empty output_dir (or set resume_from: {used}" in errors[0]
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"] and (used / "notes.txt").read_text() == "mine"
