"""`lmflow-ray eval` as the evaluation command: nll / ppl of a dataset's own text against a
hand-written loop, multiple-choice accuracy (acc, acc_norm) against hand-scored choices and on the
real SmolLM2, exact match after normalisation, a LoRA adapter dir scored without merging, the
report's identity fields, and --compare."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmflow_ray.data.tokenize import tokenize_conversation


def write(path, dtype, instances):
    path.write_text(json.dumps({"type": dtype, "instances": instances}))
    return path


T2T = [{"input": "The cat sat on the", "output": " mat and slept."},
       {"input": "A small red", "output": " ball rolled under the table, far away."},
       {"input": "Hello", "output": " world"}]
CONVS = [{"messages": [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the mat."},
                       {"role": "user", "content": "And the dog?"}, {"role": "assistant", "content": "In the garden."}]},
         {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]


def reference_nll(model, tok, examples):
    """One instance at a time, no padding: summed -log p of the learned tokens, and their count."""
    total, count = 0.0, 0
    for ids, learned in examples:
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = model(input_ids=x).logits[0, :-1].double().log_softmax(-1)
        for t in range(1, len(ids)):
            if learned[t]:
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total, count


def test_nll_and_ppl_match_a_hand_written_loop(cli, tiny_llama, tmp_path):
    from lmflow_ray.models.loading import load_for_generation

    model, tok = load_for_generation(tiny_llama)
    t2t = write(tmp_path / "t2t.json", "text2text", T2T)
    conv = write(tmp_path / "conv.json", "conversation", CONVS)
    text = write(tmp_path / "text.json", "text_only", [{"text": x["input"] + x["output"]} for x in T2T])
    hand = {
        "t2t": [([tok.bos_token_id] + tok(x["input"], add_special_tokens=False)["input_ids"]
                 + tok(x["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 None, len(tok(x["input"], add_special_tokens=False)["input_ids"]) + 1) for x in T2T],
        "text": [([tok.bos_token_id] + tok(x["input"] + x["output"], add_special_tokens=False)["input_ids"]
                  + [tok.eos_token_id], None, 1) for x in T2T],
    }
    examples = {k: [(ids, [t >= start for t in range(len(ids))]) for ids, _, start in v] for k, v in hand.items()}
    # Conversations: the ids and learned spans come from the template (tests/test_templates.py checks those).
    from lmflow_ray.data.formats import normalize

    rows = [tokenize_conversation(normalize("conversation", c), tok, None, None) for c in CONVS]
    examples["conv"] = [(r["input_ids"], [label != -100 for label in r["labels"]]) for r in rows]
    for name, path in (("t2t", t2t), ("conv", conv), ("text", text)):
        out = tmp_path / f"{name}.report.json"
        result = cli("eval", "--model", str(tiny_llama), "--data", str(path), "--metrics", "nll,ppl",
                     "--batch-size", "2", "--out", str(out))
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        total, count = reference_nll(model, tok, examples[name])
        assert report["counts"]["nll"] == count, name
        assert report["metrics"]["nll"] == pytest.approx(total / count, abs=1e-5), name
        assert report["metrics"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5), name
        assert sum(s["tokens"] for s in report["samples"]) == count
        assert f"nll {report['metrics']['nll']:.4g}" in result.stdout and str(out) in result.stdout  # one summary line
    ident = report["identity"]
    assert ident["path"] == str(tiny_llama) and ident["adapter"] is None and len(ident["fingerprint"]) == 16
    assert list(report["data_sha256"]) == [str(text)] and len(report["data_sha256"][str(text)]) == 64


def test_multiple_choice_scores_each_choice_as_the_harness_does(cli, tiny_llama, repo, tmp_path):
    from lmflow_ray.models.loading import load_for_generation

    data = repo / "examples" / "data" / "mc_tiny.json"
    out = tmp_path / "mc.json"
    result = cli("eval", "--model", str(tiny_llama), "--data", str(data), "--metrics", "accuracy", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    insts = json.loads(data.read_text())["instances"]
    model, tok = load_for_generation(tiny_llama)
    # Hand-scored: log p(" " + choice | input), the continuation's tokens after the context's.
    for inst, sample in zip(insts[:3], report["samples"]):
        ctx = tok(inst["input"], add_special_tokens=False)["input_ids"]
        for choice, got in zip(inst["choices"], sample["loglikelihoods"]):
            whole = tok(inst["input"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0, :-1].double().log_softmax(-1)
            want = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
            assert got == pytest.approx(want, abs=1e-4)
    answers = [i["answer"] if isinstance(i["answer"], int) else i["choices"].index(i["answer"]) for i in insts]
    picks = [max(range(len(s["loglikelihoods"])), key=lambda j: s["loglikelihoods"][j]) for s in report["samples"]]
    norm = [max(range(len(s["loglikelihoods"])), key=lambda j: s["loglikelihoods"][j] / len(i["choices"][j]))
            for s, i in zip(report["samples"], insts)]
    assert report["metrics"]["acc"] == sum(p == a for p, a in zip(picks, answers)) / len(insts)
    assert report["metrics"]["acc_norm"] == sum(p == a for p, a in zip(norm, answers)) / len(insts)
    assert report["counts"] == {"acc": 12, "acc_norm": 12}
    bad = cli("eval", "--model", str(tiny_llama), "--data", str(data), "--metrics", "nll", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "multiple_choice data is scored by --metrics accuracy only" in bad.stderr


def test_smollm2_answers_the_easy_multiple_choice_questions(cli, smollm2, repo, tmp_path):
    out = tmp_path / "mc.json"
    result = cli("eval", "--model", str(smollm2), "--data", str(repo / "examples/data/mc_tiny.json"),
                 "--metrics", "accuracy", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["acc"] >= 0.75 and metrics["acc_norm"] >= 0.75, metrics  # 4 choices: chance is 0.25


def test_exact_match_after_normalisation_and_compare(cli, tiny_llama, tmp_path):
    from lmflow_ray.inference import SamplingParams, make_engine

    eng = make_engine("hf", str(tiny_llama))
    [[greedy]] = eng.generate(["The cat sat on the"], SamplingParams(max_tokens=6))
    data = write(tmp_path / "qa.json", "text2text", [
        {"input": "The cat sat on the", "output": "  " + " ".join(greedy.text.split()) + " \n"},  # whitespace differs
        {"input": "A small red", "output": "certainly not this"}])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out, metrics in ((a, "accuracy,length"), (b, "accuracy,length,nll")):
        result = cli("eval", "--model", str(tiny_llama), "--data", str(data), "--metrics", metrics,
                     "--max-tokens", "6", "--out", str(out))
        assert result.returncode == 0, result.stderr
    report = json.loads(a.read_text())
    assert report["metrics"]["exact_match"] == 0.5 and report["counts"]["exact_match"] == 2
    assert [s["correct"] for s in report["samples"]] == [True, False]
    shown = cli("eval", "--compare", str(a), str(b))
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert any(line.split()[:4] == ["exact_match", "0.5000", "0.5000", "+0.0000"] for line in lines), shown.stdout
    assert any(line.split()[:3] == ["nll", "-", f"{json.loads(b.read_text())['metrics']['nll']:.4f}"] for line in lines)
    bad = cli("eval", "--compare", str(a), str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "not a readable eval report" in bad.stderr


def test_a_lora_adapter_dir_is_scored_without_merging(cli, tiny_llama, tmp_path):
    from conftest import random_lora

    from lmflow_ray.models.peft_utils import merge_lora

    torch.manual_seed(0)
    adapter = random_lora(tiny_llama, tmp_path / "adapter", std=3.0)  # large enough to move the NLL clearly
    merged = merge_lora(str(tiny_llama), str(adapter), str(tmp_path / "merged"))
    data = write(tmp_path / "t2t.json", "text2text", T2T)
    values = {}
    for name, model in (("adapter", adapter), ("merged", merged), ("base", tiny_llama)):
        out = tmp_path / f"{name}.json"
        assert cli("eval", "--model", str(model), "--data", str(data), "--metrics", "nll", "--out", str(out)).returncode == 0
        values[name] = json.loads(out.read_text())
    # tiny-llama's untrained head is near uniform (nll ~ ln 1043), so a LoRA moves the NLL by little; with the
    # seed above it moves it by ~8e-3, far more than the adapter-vs-merged tolerance.
    assert values["adapter"]["metrics"]["nll"] == pytest.approx(values["merged"]["metrics"]["nll"], abs=1e-5)
    assert abs(values["adapter"]["metrics"]["nll"] - values["base"]["metrics"]["nll"]) > 1e-3, values
    ident = values["adapter"]["identity"]
    assert ident["adapter"] == str(adapter) and ident["base"] == str(tiny_llama)
    assert ident["fingerprint"] != values["base"]["identity"]["fingerprint"]


def test_harness_on_the_local_task_equals_our_multiple_choice_accuracy(cli, tiny_llama, repo, tmp_path, hub_offline):
    """lm-evaluation-harness (its Python API, HF backend) on the bundled local task gives the same acc and
    acc_norm as `--metrics accuracy` on the same file; a task whose data must be downloaded is one line."""
    ours, theirs = tmp_path / "ours.json", tmp_path / "harness.json"
    assert cli("eval", "--model", str(tiny_llama), "--data", str(repo / "examples/data/mc_tiny.json"),
               "--metrics", "accuracy", "--out", str(ours)).returncode == 0
    result = cli("eval", "--harness", "lmflow_mc_tiny", "--model", str(tiny_llama), "--out", str(theirs))
    assert result.returncode == 0, result.stderr[-3000:]
    mine, harness = json.loads(ours.read_text()), json.loads(theirs.read_text())
    assert harness["counts"] == {"lmflow_mc_tiny": 12} and harness["harness"]["backend"] == "hf"
    assert harness["metrics"]["lmflow_mc_tiny/acc"] == pytest.approx(mine["metrics"]["acc"])
    assert harness["metrics"]["lmflow_mc_tiny/acc_norm"] == pytest.approx(mine["metrics"]["acc_norm"])
    assert harness["identity"]["fingerprint"] == mine["identity"]["fingerprint"]

    bad = cli("eval", "--harness", "hellaswag", "--model", str(tiny_llama), "--out", str(tmp_path / "h.json"))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and len(errors) == 1 and "must be downloaded from the Hugging Face Hub" in errors[0]
    assert "--harness-include" in errors[0] and not (tmp_path / "h.json").exists()
    unknown = cli("eval", "--harness", "no_such_task", "--model", str(tiny_llama), "--out", str(tmp_path / "u.json"))
    assert unknown.returncode == 2 and "unknown task no_such_task" in unknown.stderr
    try:  # the harness's vLLM backend needs the `vllm` distribution: where it is missing, one line
        import lm_eval.models.vllm_causallms  # noqa: F401
    except Exception:  # noqa: BLE001
        vllm = cli("eval", "--harness", "lmflow_mc_tiny", "--engine", "vllm", "--model", str(tiny_llama),
                   "--out", str(tmp_path / "v.json"))
        assert vllm.returncode == 2 and "vLLM backend does not load here" in vllm.stderr and "--engine hf" in vllm.stderr
