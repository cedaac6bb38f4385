"""Reward modeling, DPO and `lmflow-ray eval` on real Ray Train + DeepSpeed workers (tiny-llama, CPU).

- reward-model (configs/rm_tiny.yaml): held-out pairwise accuracy from ~chance at step 0 to
  > 90%; the saved model, loaded by RewardScorer, ranks held-out chosen over rejected.
- dpo (configs/dpo_tiny.yaml): the held-out log-prob margin log p(chosen) - log p(rejected)
  rises; precomputed reference log-probs give the same run as a reference copy; with LoRA
  the reference is the base model with adapters disabled.
- eval: the Table 5 metrics in a JSON report, reward from the trained reward model.
- Bad preference data: skipped and counted (identical, empty), or one error line (missing key).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmflow_ray.config import DPOConfig, RewardModelConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.train.run import run_finetune


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def reward_model(ray_session, repo, tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("rm") / "out"
    cfg = load_config(RewardModelConfig, repo / "configs" / "rm_tiny.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/preference_tiny.json'}"])
    run = run_finetune(cfg)
    return out, run


def test_reward_model_learns_the_preference(reward_model, repo):
    out, run = reward_model
    evals = [r for r in rows(out) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.8  # untrained head: near chance
    assert evals[-1]["eval_accuracy"] > 0.9 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 2, evals
    assert run["job"] == "reward-model" and run["final"]["save_check_max_abs_diff"] < 1e-5

    from lmflow_ray.eval.reward import RewardScorer

    scorer = RewardScorer.load(str(out))
    held = json.loads((repo / "examples/data/preference_t2t_tiny.json").read_text())["instances"][:40]
    prompts = [[{"role": "user", "content": x["prompt"]}] for x in held]
    chosen = scorer.score(prompts, [x["chosen"] for x in held])
    rejected = scorer.score(prompts, [x["rejected"] for x in held])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 36, list(zip(chosen, rejected))


def test_eval_reports_table5_metrics(reward_model, tiny_llama, repo, tmp_path, cli):
    out, _ = reward_model
    prompts = tmp_path / "prompts.json"
    held = json.loads((repo / "examples/data/preference_t2t_tiny.json").read_text())["instances"][:8]
    prompts.write_text(json.dumps({"type": "conversation", "instances": [
        {"messages": [{"role": "user", "content": x["prompt"]}]} for x in held]}))
    report = tmp_path / "report.json"
    proc = cli("eval", "--model", str(tiny_llama), "--data", str(prompts), "--reward", str(out),
                   "--metrics", "reward,response_ppl,msttr,distinct,unique,length", "--max-tokens", "40", "--out", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    m = result["metrics"]
    assert set(m) == {"reward", "response_ppl", "msttr-100", "distinct-1", "distinct-2", "unique-1", "unique-2", "length"}
    assert m["response_ppl"] > 1 and 0 < m["distinct-1"] <= 1 and m["length"] > 0
    assert len(result["samples"]) == 8 and all("reward" in s for s in result["samples"])
    assert m["reward"] == pytest.approx(sum(s["reward"] for s in result["samples"]) / 8)
    # A rule-based reward function works the same way.
    rule = tmp_path / "rule.json"
    proc = cli("eval", "--model", str(tiny_llama), "--data", str(prompts), "--metrics", "reward,length",
                   "--reward", "lmflow_ray.eval.reward_functions:on_topic", "--max-tokens", "8", "--out", str(rule))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(rule.read_text())["metrics"]) == {"reward", "length"}
    bad = cli("eval", "--model", str(tiny_llama), "--data", str(prompts), "--reward", "nosuchmodule:f",
                  "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "nosuchmodule" in bad.stderr and "Traceback" not in bad.stderr


def _dpo(repo, out: Path, **sets):
    sets = {"data.path": repo / "examples/data/preference_tiny.json", **sets}
    cfg = load_config(DPOConfig, repo / "configs" / "dpo_tiny.yaml",
                      [f"output_dir={out}", *(f"{k}={v}" for k, v in sets.items())])
    return run_finetune(cfg)


def preference_parquet(repo, path: Path) -> Path:
    """preference_tiny.json's pairs as TRL-style conversational columns (prompt / chosen / rejected
    message lists) under other names, in a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = json.loads((repo / "examples/data/preference_tiny.json").read_text())["instances"]
    pq.write_table(pa.Table.from_pylist([{
        "question": p["chosen"]["messages"][:1], "good": p["chosen"]["messages"][1:],
        "bad": p["rejected"]["messages"][1:]} for p in pairs]), path)
    return path


def test_dpo_raises_the_heldout_logp_margin(ray_session, repo, tmp_path, tiny_llama):
    copy, pre = tmp_path / "copy", tmp_path / "pre"
    _dpo(repo, copy, **{"train.num_epochs": 1})
    evals = [r for r in rows(copy) if "eval_logp_margin" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_kl"] == pytest.approx(0, abs=1e-4)  # policy == reference
    assert evals[-1]["eval_logp_margin"] > evals[0]["eval_logp_margin"] + 5, evals
    assert evals[-1]["eval_reward_accuracy"] > 0.9 and evals[-1]["eval_loss"] < 0.5
    # Reference log-probs precomputed in one Ray Data pass: the same start. Policy == reference there, so
    # the first step's loss is log 2 exactly when the precomputed log-probs are right (wrong ones move it).
    # This run reads the same pairs from Parquet with renamed columns (data.columns): the same
    # data-dependent figures (log-prob margins of the first step and of the held-out split).
    _dpo(repo, pre, **{"train.num_epochs": 1, "train.max_steps": 1, "dpo.reference": "precompute",
                       "data.path": preference_parquet(repo, tmp_path / "pairs.parquet"),
                       "data.columns.prompt": "question", "data.columns.chosen": "good",
                       "data.columns.rejected": "bad"})
    a, b = rows(copy), rows(pre)
    assert b[0]["step"] == 0 and b[0]["eval_loss"] == pytest.approx(a[0]["eval_loss"], rel=1e-4)
    assert b[0]["eval_logp_margin"] == pytest.approx(a[0]["eval_logp_margin"], rel=1e-4)
    assert b[1]["step"] == 1 and b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-4)
    assert b[1]["logp_margin"] == pytest.approx(a[1]["logp_margin"], rel=1e-4) and abs(a[1]["logp_margin"]) > 1e-2
    assert b[1]["loss"] == pytest.approx(math.log(2), rel=1e-4)


def test_dpo_with_lora_uses_the_base_as_reference(ray_session, repo, tmp_path, tiny_llama):
    out = tmp_path / "lora"
    _dpo(repo, out, **{"train.num_epochs": 1, "lora.enabled": "true", "lora.r": 8,
                       "lora.target_modules": '["q_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]',
                       "train.lr": 5e-3, "scaling.num_workers": 1})
    evals = [r for r in rows(out) if "eval_logp_margin" in r]
    assert evals[0]["eval_kl"] == pytest.approx(0, abs=1e-4)  # LoRA B = 0: policy == base at the start
    assert evals[-1]["eval_logp_margin"] > evals[0]["eval_logp_margin"] and evals[-1]["eval_kl"] != 0
    assert (out / "model" / "adapter_config.json").is_file()


def test_bad_preference_data(ray_session, tmp_path, repo, capsys):
    from lmflow_ray.cli import main

    good = json.loads((repo / "examples/data/preference_t2t_tiny.json").read_text())["instances"][:20]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps({"type": "paired_text_to_text", "instances": good + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "", "rejected": "x"}]}))
    out = tmp_path / "out"
    code = main(["reward-model", "--config", str(repo / "configs/rm_tiny.yaml"), "--set", f"output_dir={out}",
                 "--set", f"data.path={data}", "--set", "data.eval_split=0", "--set", "train.num_epochs=1",
                 "--set", "scaling.num_workers=1", "--set", "train.global_batch_size=8",
                 # A LoRA reward model (adapters + the score head) on the way: it must reload and score.
                 "--set", "lora.enabled=true", "--set", "lora.target_modules=[q_proj,v_proj]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "skipped pairs: {'identical': 1, 'empty': 1}" in printed.out
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["rows"] == 20 and run["data"]["skipped_pairs"]["identical"] == 1
    assert run["final"]["save_check_max_abs_diff"] < 1e-5 and (out / "model" / "adapter_config.json").is_file()
    from lmflow_ray.eval.reward import RewardScorer

    scores = RewardScorer.load(str(out / "model")).score(["q", "q"], ["an answer", "another"])
    assert len(scores) == 2 and all(isinstance(x, float) for x in scores)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"type": "paired_text_to_text", "instances": [{"prompt": "q", "chosen": "a"}]}))
    from lmflow_ray.cli import main

    assert main(["dpo", "--config", str(repo / "configs/dpo_tiny.yaml"), "--set", f"data.path={missing}",
                 "--set", f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err
    assert "instance 0" in err and "rejected" in err, err
    assert main(["dpo", "--config", str(repo / "configs/dpo_tiny.yaml"), "--set", "dpo.beta=0",
                 "--set", f"output_dir={tmp_path / 'o3'}"]) == 2
    assert "key 'dpo.beta': must be > 0" in capsys.readouterr().err
