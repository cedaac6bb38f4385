"""LoRA on the real SmolLM2-135M-Instruct teaches a format it gets wrong (slow: ~3-4 min on 2 cores).

The kv2json task asks for one line of JSON; the base model answers with pretty-printed JSON and
prose. After 6 LoRA steps of configs/sft_smollm2_lora.yaml on Ray Train + DeepSpeed the held-out
prompts — names and cities never seen in training — are answered exactly.
"""

from __future__ import annotations

import json

import pytest

from lmflow_ray.config import FinetuneConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.eval.accuracy import exact_match
from lmflow_ray.train.run import run_finetune


@pytest.mark.e2e
def test_lora_smollm2_improves_heldout_exact_match(ray_session, repo, tmp_path, smollm2):
    out = tmp_path / "lora"
    cfg = load_config(FinetuneConfig, repo / "configs" / "sft_smollm2_lora.yaml",
                      [f"output_dir={out}", f"data.path={repo / 'examples/data/kv2json_train.json'}",
                       "train.save_steps=0", "train.max_steps=6"])  # 6 of the config's 12 steps suffice; no mid-run checkpoint
    run = run_finetune(cfg)
    assert run["final"]["save_check_max_abs_diff"] < 1e-4
    assert (out / "model" / "adapter_config.json").is_file()
    heldout = repo / "examples" / "data" / "kv2json_heldout.json"
    before = exact_match(smollm2, heldout, limit=8)
    after = exact_match(out, heldout, limit=8)
    print(json.dumps({"before": before, "after": after}, indent=1))
    assert before["exact_match"] <= 0.25
    assert after["exact_match"] >= 0.75
    assert after["exact_match"] - before["exact_match"] >= 0.5
