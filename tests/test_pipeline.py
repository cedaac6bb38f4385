"""`lmflow-ray pipeline`: configs/pipeline_tiny.yaml (LoRA SFT -> merge -> RAFT -> eval -> serve) on
tiny-llama, with --no-serve; a rerun skips what is complete; --only reruns one stage; bad
references are one line naming the key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import free_port

from lmflow_ray.errors import UserError
from lmflow_ray.pipeline import resolve_refs, run_pipeline


def test_tiny_pipeline_runs_every_stage_then_skips_what_is_complete(ray_session, repo, tmp_path, tiny_llama, capsys):
    out = tmp_path / "out"
    config = str(repo / "configs" / "pipeline_tiny.yaml")
    report = run_pipeline(config, [f"output_dir={out}"], no_serve=True)
    first = capsys.readouterr().out
    assert "[pipeline] raft (raft) done in" in first and "reward" in first

    assert (out / "sft" / "model" / "adapter_config.json").is_file()  # a LoRA finetune ...
    assert (out / "merge" / "config.json").is_file()  # ... merged into a full model ...
    raft = json.loads((out / "raft" / "run.json").read_text())
    assert raft["config"]["model"] == str(out / "merge")  # ... which RAFT started from
    assert [r["iteration"] for r in raft["iterations"]] == [1, 2]
    evals = json.loads((out / "eval" / "report.json").read_text())["models"]
    assert set(evals) == {"base", "sft", "aligned"}
    assert evals["aligned"]["model"] == str(out / "raft")
    assert all(0.0 <= e["metrics"]["reward"] <= 1.0 for e in evals.values())

    text = report.read_text()
    for row in ("| sft | finetune | complete |", "| merge | merge-lora | complete |", "| raft | raft | complete |",
                "| eval | eval | complete |", "| serve | serve | skipped |"):
        assert row in text, text
    assert "![sft loss](sft/loss.png)" in text and (out / "sft" / "loss.png").is_file()
    assert "![raft reward](raft/reward.png)" in text and (out / "raft" / "reward.png").is_file()
    aligned_row = next(line for line in text.splitlines() if line.startswith("| aligned |"))
    assert f"{evals['aligned']['metrics']['reward']:.4f}" in aligned_row

    # A rerun finds every stage complete and runs nothing.
    stamps = {p: p.stat().st_mtime for p in (out / "sft" / "run.json", out / "eval" / "report.json")}
    run_pipeline(config, [f"output_dir={out}"], no_serve=True)
    again = capsys.readouterr().out
    started = [line for line in again.splitlines() if "===" in line]
    assert again.count("complete, skipped") == 4 and started == ["[pipeline] === serve (serve) ==="], again
    assert all(p.stat().st_mtime == t for p, t in stamps.items())

    # --only reruns one stage (its output replaced), nothing else.
    run_pipeline(config, [f"output_dir={out}"], only="eval", no_serve=True)
    only = capsys.readouterr().out
    assert "=== eval (eval) ===" in only and "=== raft" not in only
    assert (out / "eval" / "report.json").stat().st_mtime > stamps[out / "eval" / "report.json"]
    assert (out / "sft" / "run.json").stat().st_mtime == stamps[out / "sft" / "run.json"]

    # The serve stage, as a user runs it: the curl and openai lines it prints answer; Ctrl-C ends it.
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmflow_ray", "pipeline", "--config", config, "--set",
                             f"output_dir={out}", "--set", f"stages.serve.port={port}", "--only", "serve"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.time() + 240
        while not any(line.startswith("python -c") for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines[-30:])
            lines.append(proc.stdout.readline())
        curl = next(line for line in lines if line.startswith("curl "))
        python = next(line for line in lines if line.startswith("python -c"))
        assert f"127.0.0.1:{port}" in curl and "'aligned'" in python
        answer = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120, check=True).stdout)
        assert answer["model"] == "aligned" and answer["choices"][0]["message"]["content"]
        said = subprocess.run(python.replace("python", sys.executable, 1), shell=True, capture_output=True, text=True,
                              timeout=120)
        assert said.returncode == 0 and said.stdout.strip(), said.stderr[-2000:]
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    assert "[pipeline] serve (serve) done in" in rest
    # A quiet console: no Ray worker lines (they are in OUT/logs/console.log).
    assert not [line for line in lines + rest.splitlines() if " pid=" in line], "".join(lines) + rest
    assert "(ServeReplica:" in (out / "logs" / "console.log").read_text()


def _config(tmp_path, stages: dict) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": stages}))
    return str(path)


def test_references_must_name_an_earlier_stage(tmp_path):
    from lmflow_ray.config import PipelineConfig
    from lmflow_ray.config_loading import load_config

    stages = {"eval": {"kind": "eval", "models": {"aligned": "${stages.raft.output}"}, "data": "d.json",
                       "metrics": ["length"]},
              "raft": {"kind": "raft", "config": "configs/raft_tiny.yaml"}}
    path = _config(tmp_path, stages)
    with pytest.raises(UserError, match=r"stages\.eval\.models\.aligned: 'raft' does not run before 'eval'"):
        resolve_refs(load_config(PipelineConfig, path), path)
    stages["eval"]["models"]["aligned"] = "${stages.rlhf.output}"
    path = _config(tmp_path, stages)
    with pytest.raises(UserError, match=r"stages\.eval\.models\.aligned: no stage named 'rlhf' \(stages: eval, raft\)"):
        resolve_refs(load_config(PipelineConfig, path), path)


def test_bad_pipeline_configs_are_one_line_exit_2(tmp_path, cli):
    missing = _config(tmp_path, {"eval": {"kind": "eval", "data": "d.json", "metrics": ["length"]}})
    result = cli("pipeline", "--config", missing)
    assert result.returncode == 2 and "key 'stages.eval': eval stages need models" in result.stderr, result.stderr
    ok = _config(tmp_path, {"merge": {"kind": "merge-lora", "base": "tiny-llama", "adapter": "x"}})
    result = cli("pipeline", "--config", ok, "--only", "sft")
    assert result.returncode == 2 and "--only sft: no such stage; stages: merge" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_stage_stopped_before_its_first_checkpoint_starts_over(tmp_path, repo, monkeypatch):
    """Ray Train makes OUT/checkpoints/ray_train before any checkpoint, an RL run writes .iter_NNN.tmp first:
    neither is resumable, so the stage's directory is cleared and the job starts over."""
    from lmflow_ray.config import StageConfig
    from lmflow_ray.pipeline import _job_config

    monkeypatch.chdir(repo)
    sft, raft = tmp_path / "sft", tmp_path / "raft"
    (sft / "checkpoints" / "ray_train").mkdir(parents=True)
    (raft / "checkpoints" / ".iter_001.tmp").mkdir(parents=True)
    cfg = _job_config(StageConfig(kind="finetune", config="configs/sft_tiny_zero3.yaml"), sft)
    assert cfg.resume_from is None and not sft.exists()
    cfg = _job_config(StageConfig(kind="raft", config="configs/raft_tiny.yaml"), raft)
    assert cfg.resume_from is None and not raft.exists()
    (sft / "checkpoints" / "ray_train" / "checkpoint_000001").mkdir(parents=True)
    (sft / "checkpoints" / "ray_train" / "checkpoint_000001" / "trainer_state.json").write_text('{"step": 4}')
    assert _job_config(StageConfig(kind="finetune", config="configs/sft_tiny_zero3.yaml"), sft).resume_from == str(sft)
