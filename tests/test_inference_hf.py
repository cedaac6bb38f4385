"""HFEngine: every SamplingParams knob changes the output the way it says, plus streaming,
speculative decoding, LoRA adapters, rope scaling and the `infer` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_lora, run_cli

from lmflow_ray.cli import main
from lmflow_ray.errors import UserError
from lmflow_ray.inference import SamplingParams, make_engine

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine("hf", tiny_llama)


@pytest.fixture(scope="module")
def greedy(engine):
    return engine.generate(PROMPTS, SamplingParams(max_tokens=24, logprobs=True))


def test_greedy_is_deterministic_and_left_padding_is_invisible(engine, greedy):
    again = engine.generate(PROMPTS, SamplingParams(max_tokens=24))
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in greedy]
    # Batched with a longer prompt (so left-padded) = alone.
    alone = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=24))
    assert alone[0][0].token_ids == greedy[0][0].token_ids
    c = greedy[0][0]
    assert c.finish_reason == "length" and len(c.token_ids) == 24 and c.text == engine.tokenizer.decode(c.token_ids)


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    def sample(seed):
        out = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed))
        return [g[0].token_ids for g in out]

    torch.manual_seed(123)
    a = sample(7)
    torch.manual_seed(456)  # the caller's RNG state does not matter
    assert sample(7) == a
    assert sample(8) != a


def test_n_completions_per_prompt(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, seed=0, n=3))
    assert [len(g) for g in out] == [3, 3]
    assert len({tuple(c.token_ids) for c in out[0]}) == 3  # three different samples
    greedy3 = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, n=3))
    assert len(greedy3[0]) == 3 and len({c.text for c in greedy3[0]}) == 1


def test_stop_strings_cut_the_text(engine, greedy):
    full = greedy[1][0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=24, stop=[stop, "never-seen-stop"]))
    c = out[1][0]
    assert c.text == full[:cut] and c.finish_reason == "stop"
    assert len(c.token_ids) < 24 and stop in engine.tokenizer.decode(c.token_ids)
    assert "".join(engine.stream(PROMPTS[1], SamplingParams(max_tokens=24, stop=[stop]))) == full[:cut]


def test_logprobs_match_a_forward_pass(engine, greedy):
    for prompt, (c,) in zip(PROMPTS, greedy):
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
        prompt_ids = engine.tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + c.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(prompt_ids) - 1: -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-3)
        # Greedy picks the argmax, so each chosen token is the most likely one.
        assert torch.equal(logits.argmax(-1), torch.tensor(c.token_ids))


def test_top_logprobs_are_the_forward_pass_top_k(engine, greedy):
    (c,), = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3))
    prompt_ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt_ids + c.token_ids])).logits[0, len(prompt_ids) - 1: -1]
    best = torch.log_softmax(logits, -1).topk(3, dim=-1)
    assert len(c.top_logprobs) == len(c.token_ids) == 6
    for t, (token, alts) in enumerate(zip(c.token_ids, c.top_logprobs)):
        assert [a for a, _ in alts] == best.indices[t].tolist() and alts[0][0] == token
        assert torch.allclose(torch.tensor([lp for _, lp in alts]), best.values[t], atol=1e-3)
    with pytest.raises(UserError, match="top_logprobs needs logprobs on"):
        SamplingParams(top_logprobs=2)


def test_stream_yields_pieces_that_join_to_the_greedy_text(engine, greedy):
    pieces = list(engine.stream(PROMPTS[1], SamplingParams(max_tokens=24)))
    assert len(pieces) >= 3
    assert "".join(pieces) == greedy[1][0].text


def test_speculative_decoding_keeps_greedy_text(tiny_llama, greedy):
    spec = make_engine("hf", tiny_llama, draft_model=tiny_llama, num_draft_tokens=4)
    out = spec.generate(PROMPTS, SamplingParams(max_tokens=24))
    assert [g[0].text for g in out] == [g[0].text for g in greedy]
    s = spec.last_speculation
    # The draft is the target itself: every drafted token is accepted, ~5 tokens per target forward.
    assert s.acceptance_rate > 0.95 and s.tokens_per_target_forward > 3
    assert s.new_tokens == 48
    assert "".join(spec.stream(PROMPTS[0], SamplingParams(max_tokens=24))) == greedy[0][0].text


def test_lora_adapter_and_rope_scaling_change_the_output(tiny_llama, greedy, tmp_path):
    from lmflow_ray.models.loading import load_for_generation

    random_lora(tiny_llama, tmp_path / "adapter")
    adapted = make_engine("hf", tmp_path / "adapter")
    assert adapted.generate(PROMPTS, SamplingParams(max_tokens=24))[1][0].text != greedy[1][0].text

    # Linear rope scaling divides the rotary frequencies (built when the weights load) by the factor.
    scaled = make_engine("hf", tiny_llama, rope_scaling={"rope_type": "linear", "factor": 4.0})
    base, tok = load_for_generation(tiny_llama)
    assert torch.allclose(scaled.model.model.rotary_emb.inv_freq * 4, base.model.rotary_emb.inv_freq)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(ids).logits
        assert (scaled.model(ids).logits - plain).abs().max() > 1e-3


def test_bad_requests_are_user_errors(tiny_llama):
    with pytest.raises(UserError, match="unknown engine 'tgi'"):
        make_engine("tgi", tiny_llama)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match="max_tokens"):
        SamplingParams(max_tokens=0)


@pytest.mark.e2e
def test_smollm2_chat_answers_paris(smollm2):
    eng = make_engine("hf", smollm2)
    (c,), = eng.chat([[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_tokens=16))
    assert "Paris" in c.text and c.finish_reason == "stop"


# ------------------------------------------------------------------ the infer CLI


@pytest.fixture
def conversations(tmp_path):
    data = {"type": "conversation", "instances": [
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]},
        {"system": "Be brief.", "messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                                             {"role": "user", "content": "Two?"}]},
        {"messages": [{"role": "user", "content": "Three?"}]},
    ]}
    path = tmp_path / "convs.json"
    path.write_text(json.dumps(data))
    return path


def test_infer_cli_writes_text2text_and_never_overwrites(tiny_llama, conversations, tmp_path, capsys):
    from lmflow_ray.data.source import validate

    out = tmp_path / "answers.json"
    args = ["infer", "--model", str(tiny_llama), "--data", str(conversations), "--out", str(out), "--max-tokens", "8"]
    assert main(args) == 0
    assert validate(out).type == "text2text" and validate(out).instances == 3
    rows = json.loads(out.read_text())["instances"]
    assert rows[1]["input"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert rows[1]["input"].endswith("Two?<|im_end|>\n<|im_start|>assistant\n") and "1<|im_end|>" in rows[1]["input"]
    assert all(r["output"] for r in rows)
    before = out.read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["infer", "--model", str(tiny_llama), "--data", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "dataset not found" in capsys.readouterr().err
    named = tmp_path / "llama3.json"
    assert main(["infer", "--model", str(tiny_llama), "--data", str(conversations), "--out", str(named),
                 "--max-tokens", "4", "--template", "llama3"]) == 0
    assert json.loads(named.read_text())["instances"][2]["input"].startswith("<|begin_of_text|><|start_header_id|>user")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.json", "convs.json", "llama3.json"]  # no temp files


def test_infer_cli_stream_prints_tokens(tiny_llama, tmp_path):
    data = tmp_path / "t2t.json"
    data.write_text(json.dumps({"type": "text2text", "instances": [{"input": PROMPTS[1], "output": ""}]}))
    out = tmp_path / "streamed.json"
    proc = run_cli("infer", "--model", str(tiny_llama), "--data", str(data), "--out", str(out), "--stream",
                   "--max-tokens", "24", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["instances"]
    assert row["output"] and f"[0] {row['output']}" in proc.stdout
