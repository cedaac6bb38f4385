"""The model zoo: SmolLM2 from its PyPI wheel answers sensibly; tiny-llama builds offline."""

from __future__ import annotations

import json

import pytest
import torch

from lmflow_ray.errors import UserError
from lmflow_ray.models.zoo import resolve_model


@pytest.mark.e2e
def test_smollm2_from_pypi_answers_capital_of_france(smollm2):
    from lmflow_ray.inference.hf import chat_generate
    from lmflow_ray.models.loading import load_for_generation

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # fp32, dequantised
    model, tok = load_for_generation(smollm2)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    answer = chat_generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                           max_new_tokens=16)[0]
    assert "Paris" in answer


def test_tiny_llama_is_deterministic_and_real_bpe(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.models.zoo import build_tiny_llama

    monkeypatch.setenv("LMFLOW_RAY_CACHE", str(tmp_path / "cache"))
    again = tmp_path / "again"
    build_tiny_llama(again)
    a = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "The model learns the capital of France; ünïcödé 2026!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges learned, bytes covered
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_resolve_model_names_paths_and_errors(tiny_llama, tmp_path):
    assert resolve_model("tiny-llama") == tiny_llama
    assert resolve_model(str(tiny_llama)) == tiny_llama
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    assert resolve_model(str(out)) == out / "model"  # a training output dir
    with pytest.raises(UserError, match="neither a zoo name"):
        resolve_model(str(tmp_path / "nothing"))


def test_models_cli(tiny_llama, cli):
    proc = cli("models", "fetch", "tiny-llama")
    assert proc.returncode == 0 and proc.stdout.strip() == str(tiny_llama)
    proc = cli("models", "list")
    assert proc.returncode == 0 and "smollm2-135m-instruct" in proc.stdout and "tiny-llama" in proc.stdout
    proc = cli("models", "fetch", "gpt-17")
    assert proc.returncode == 2 and "unknown zoo model 'gpt-17'" in proc.stderr
