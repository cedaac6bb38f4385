"""`lmflow-ray vocab extend` on a generated domain corpus (examples/data/domain_corpus.txt):
fewer tokens for the domain's text, unchanged logits for text without new tokens, new embedding
rows that start as the mean of their pieces, a continued-pretraining run that lowers the
perplexity, vLLM serving the extended SmolLM2, and bad inputs as one line."""

from __future__ import annotations

import json

import pytest
import torch

CORPUS = "examples/data/domain_corpus.txt"


@pytest.fixture(scope="module")
def extended(tiny_llama, repo, tmp_path_factory):
    from lmflow_ray.train.vocab import extend_vocabulary

    out = tmp_path_factory.mktemp("vocab") / "tiny-bio"
    info = extend_vocabulary(str(tiny_llama), str(repo / CORPUS), 40, out)
    return out, info


def test_the_domain_takes_fewer_tokens_and_other_text_keeps_its_logits(extended, tiny_llama):
    from lmflow_ray.models.loading import load_causal_lm, load_tokenizer

    out, info = extended
    assert info["added"] >= 20 and info["tokens_ratio"] < 0.5, info  # the domain's words are single tokens now
    assert json.loads((out / "vocab.json").read_text())["added"] == info["added"]
    base_tok, new_tok = load_tokenizer(tiny_llama), load_tokenizer(out)
    plain = "The king sees the green tree by the sea. A child paints the old clock."
    ids = base_tok(plain, return_tensors="pt")["input_ids"]
    assert torch.equal(new_tok(plain, return_tensors="pt")["input_ids"], ids)  # no new token in it
    base, new = load_causal_lm(tiny_llama), load_causal_lm(out)
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, new(input_ids=ids).logits
    assert torch.allclose(a, b[..., : a.shape[-1]], atol=1e-5)
    # A new token's embedding (and untied head row) is the mean of its pieces' rows in the base model.
    first = info["tokens"][0]["text"]
    new_id = new_tok.convert_tokens_to_ids(first)
    pieces = base_tok(first, add_special_tokens=False)["input_ids"]
    assert new_tok(first, add_special_tokens=False)["input_ids"] == [new_id]
    emb_base, emb_new = base.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert torch.allclose(emb_new[new_id], emb_base[pieces].mean(0), atol=1e-6)
    assert torch.allclose(new.get_output_embeddings().weight[new_id], base.get_output_embeddings().weight[pieces].mean(0),
                          atol=1e-6)


def test_continued_pretraining_of_the_extended_model_lowers_perplexity(ray_session, extended, repo, tmp_path, cli):
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune

    out, _ = extended
    lines = (repo / CORPUS).read_text().splitlines()
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"type": "text_only", "instances": [{"text": " ".join(lines[i:i + 4])}
                                                                    for i in range(0, 320, 4)]}))
    held = tmp_path / "held.json"
    held.write_text(json.dumps({"type": "text_only", "instances": [{"text": t} for t in lines[360:]]}))
    base = {"model": str(out), "data": {"path": str(train), "max_length": 128}, "output_dir": str(tmp_path / "cpt"),
            "deepspeed": "zero0", "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "train": {"num_epochs": 1, "max_steps": 8, "micro_batch_size": 8, "lr": 3e-3}}
    run_finetune(load_config(FinetuneConfig, None, [], base=base))
    ppl = {}
    for name, model in (("extended", out), ("trained", tmp_path / "cpt")):
        report = tmp_path / f"{name}.json"
        assert cli("eval", "--model", str(model), "--data", str(held), "--metrics", "ppl", "--out", str(report)).returncode == 0
        ppl[name] = json.loads(report.read_text())["metrics"]["ppl"]
    assert ppl["trained"] < 0.7 * ppl["extended"], ppl


def test_the_extended_smollm2_runs_on_vllm(smollm2, repo, tmp_path):
    from lmflow_ray.inference import SamplingParams, make_engine
    from lmflow_ray.train.vocab import extend_vocabulary

    info = extend_vocabulary(str(smollm2), str(repo / CORPUS), 16, tmp_path / "smol-bio")
    assert info["added"] >= 8 and info["tokens_ratio"] < 0.95, info
    engine = make_engine("vllm", str(tmp_path / "smol-bio"), max_model_len=256)
    text = "The phosphorylation of the kinase"
    [[greedy]] = engine.generate([text], SamplingParams(max_tokens=8))
    assert greedy.text.strip() and len(greedy.token_ids) == 8
    new_ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(new_ids) >= info["vocab_size"] - info["added"]  # the prompt uses an added token


@pytest.mark.parametrize("args, expected", [
    (["--corpus", "nope.txt", "--new-tokens", "8"], "--corpus nope.txt: no such file or directory"),
    (["--corpus", "EMPTY", "--new-tokens", "8"], "empty (no text to learn tokens from)"),
    (["--corpus", CORPUS, "--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--corpus", "examples/data/sft_tiny.json", "--new-tokens", "8"], "must be text_only, not 'conversation'"),
])
def test_bad_inputs_are_one_line(cli, tiny_llama, tmp_path, args, expected):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = cli("vocab", "extend", "--model", str(tiny_llama), *args, "--out", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "out").exists()
