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
