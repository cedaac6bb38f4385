"""`lmflow-ray infer --workers N`: Ray Data batch inference with a pool of engine actors.

Greedy answers from the actor pool must equal the single-process answers, in dataset order,
for plain prompts and for conversations (templated inside the actors).
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    words = ["apple", "river", "stone", "cloud", "music", "paper", "green", "seven"]
    t2t = {"type": "text2text", "instances": [{"input": f"{w} {i} {words[(i * 3) % 8]}", "output": ""}
                                              for i, w in enumerate(words * 5)]}
    convs = {"type": "conversation", "instances": [
        {"system": "Be brief." if i % 2 else "", "messages": [{"role": "user", "content": f"Say {w}."}]}
        for i, w in enumerate(words)]}
    (d / "t2t.json").write_text(json.dumps(t2t))
    (d / "convs.json").write_text(json.dumps(convs))
    return d


@pytest.mark.parametrize("name", ["t2t.json", "convs.json"])
def test_actor_pool_matches_single_process(ray_session, tiny_llama, prompt_files, tmp_path, name, cli):
    data = prompt_files / name
    common = ["infer", "--model", str(tiny_llama), "--data", str(data), "--max-tokens", "10"]
    single = cli(*common, "--out", str(tmp_path / "single.json"))
    assert single.returncode == 0, single.stderr
    # In this process the command joins the session's cluster, as `ray job submit` jobs join theirs.
    pooled = cli(*common, "--out", str(tmp_path / "pooled.json"), "--workers", "2", "--batch-size", "4")
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    a = json.loads((tmp_path / "single.json").read_text())["instances"]
    b = json.loads((tmp_path / "pooled.json").read_text())["instances"]
    assert len(b) == len(json.loads(data.read_text())["instances"])
    assert [r["input"] for r in b] == [r["input"] for r in a]  # dataset order kept
    assert [r["output"] for r in b] == [r["output"] for r in a]
    assert "answers" in pooled.stderr and "tokens/s" in pooled.stderr  # progress lines


def test_eval_scoring_over_an_actor_pool_matches_one_process(ray_session, tiny_llama, repo, tmp_path, cli):
    """`lmflow-ray eval --workers 2`: nll/ppl of conversations and multiple-choice accuracy scored by two model
    actors over Ray Data give the single-process numbers and per-sample details, in dataset order."""
    for data, metrics in ((repo / "examples/data/sft_tiny.json", "nll,ppl"), (repo / "examples/data/mc_tiny.json", "accuracy")):
        reports = {}
        for workers in ("0", "2"):
            out = tmp_path / f"{data.stem}-{workers}.json"
            result = cli("eval", "--model", str(tiny_llama), "--data", str(data), "--metrics", metrics,
                         "--batch-size", "8", "--workers", workers, "--out", str(out))
            assert result.returncode == 0, result.stderr
            reports[workers] = json.loads(out.read_text())
        one, pool = reports["0"], reports["2"]
        assert pool["metrics"] == pytest.approx(one["metrics"], rel=1e-6) and pool["counts"] == one["counts"]
        assert pool["instances"] == one["instances"] > 10
        for a, b in zip(pool["samples"], one["samples"]):  # the same instance at the same place
            if metrics == "nll,ppl":
                assert a["tokens"] == b["tokens"] and a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)
            else:
                assert a["input"] == b["input"] and a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-6)
    bad = cli("eval", "--model", str(tiny_llama), "--data", str(repo / "examples/data/sft_tiny.json"),
              "--metrics", "length", "--workers", "2", "--out", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "--workers N distributes nll, ppl and multiple-choice accuracy" in bad.stderr
