"""Finetuning on real Ray Train workers with real DeepSpeed engines (tiny-llama, CPU).

Covers: ZeRO-2 and ZeRO-3 on 2 workers (loss falls, saved model reloads with the same
logits), loss normalised over the global batch (1 worker == 2 workers == hand computed),
resume from a checkpoint (same step count, schedule and data position), a worker killed
mid-run (the run restarts from its checkpoint and finishes), LISA, LoRA + merge-lora.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from lmflow_ray.train.run import run_finetune

PRETRAIN = "examples/data/pretrain_tiny.json"


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def check_saved_model(out: Path, checkpoints: Path | None = None) -> None:
    """OUT/model reloads with plain transformers and gives the in-memory model's logits."""
    from transformers import AutoModelForCausalLM

    run = json.loads((out / "run.json").read_text())
    assert run["final"]["save_check_max_abs_diff"] < 1e-5
    probe = torch.load(out / "save_check.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "model" / name).is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert list((checkpoints or out / "checkpoints").glob("*/checkpoint_*"))


def assert_loss_falls(rows: list[dict], factor: float = 0.7) -> None:
    rows = [r for r in rows if "loss" in r]  # not the step-0 eval row
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < factor * first, (first, last)


def test_zero2_two_workers_loss_falls_and_model_reloads(reference_zero2):
    rows = metrics(reference_zero2)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
        assert all(r[key] is not None for r in rows), key
    assert_loss_falls(rows)
    check_saved_model(reference_zero2)
    run = json.loads((reference_zero2 / "run.json").read_text())
    assert run["deepspeed"]["zero_optimization"]["stage"] == 2 and run["final"]["step"] == 16


def test_zero3_two_workers_pretraining_packed(ray_session, repo, tmp_path, tiny_llama):
    out = tmp_path / "out"
    run = run_finetune(make_cfg(repo, out, data=PRETRAIN, deepspeed="zero3",
                                **{"train.num_epochs": 3, "train.gradient_checkpointing": "true"}))
    assert run["data"]["packing"] is True and run["deepspeed"]["zero_optimization"]["stage"] == 3
    rows = metrics(out)
    assert_loss_falls(rows)
    check_saved_model(out)


def _rows_of_varied_length(path: Path) -> None:
    convs = []
    for i in range(8):
        answer = " ".join(["the cat sees the red ball"] * (1 + 3 * (i % 4)))
        convs.append({"messages": [{"role": "user", "content": f"question {i}"},
                                   {"role": "assistant", "content": answer}]})
    path.write_text(json.dumps({"type": "conversation", "instances": convs}))


def test_loss_is_mean_over_global_batch_tokens(ray_session, tmp_path, repo, tiny_llama):
    """2 workers x 2 accumulation steps == hand-computed token mean over the global batch (on these rows of
    varied length the token mean and the mean of per-row means differ: asserted below).

    The run reads the conversations as OpenAI-chat rows from a `datasets.save_to_disk` directory
    (data/shapes.py): its first-step loss is the one computed on the LMFlow JSON instances."""
    import datasets

    data = tmp_path / "varied.json"
    _rows_of_varied_length(data)
    hf_dir = tmp_path / "varied_hf"
    datasets.Dataset.from_list(json.loads(data.read_text())["instances"]).save_to_disk(str(hf_dir))
    out = tmp_path / "w2"
    run = run_finetune(make_cfg(repo, out, data=str(hf_dir), **{
        "scaling.num_workers": 2, "train.micro_batch_size": 2, "train.global_batch_size": 8,
        "train.num_epochs": 1, "train.max_steps": 1, "train.save_steps": 0, "deepspeed": "zero0"}))
    assert run["data"]["type"] == "conversation" and run["plan"]["accumulation"] == 2
    [row] = metrics(out)
    loss, seen = row["loss"], (row["tokens_seen"], row["padding_tokens_seen"])

    from lmflow_ray.data.formats import normalize
    from lmflow_ray.data.tokenize import tokenize_conversation
    from lmflow_ray.models.loading import load_causal_lm, load_tokenizer
    from lmflow_ray.models.scoring import token_nll_sum

    tok, model = load_tokenizer(tiny_llama), load_causal_lm(tiny_llama)
    sums, counts, lengths, graph = [], [], [], []
    for inst in json.loads(data.read_text())["instances"]:
        ex = tokenize_conversation(normalize("conversation", inst), tok, None, 128)
        lengths.append(len(ex["input_ids"]))
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits
        s, n = token_nll_sum(logits, torch.tensor([ex["labels"]]))
        graph.append(s)
        sums.append(float(s.detach()))
        counts.append(int(n))
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts)) / len(sums)
    assert abs(token_mean - mean_of_means) > 1e-3  # the data makes the two normalisations differ
    assert loss == pytest.approx(token_mean, rel=1e-4)
    # tokens_seen counts real tokens only; the pad positions of each pad-to-longest micro-batch apart.
    assert seen[0] == sum(lengths), (seen, lengths)
    assert 0 < seen[1] < sum(max(lengths) - n for n in lengths) + 1, (seen, lengths)

    # The one AdamW step moved each weight by ~lr against the sign of the global batch's mean gradient
    # (Adam's first step is g / |g|): the workers' gradients were all-reduced (in ZeRO-0's bounded buckets,
    # train/step.py) before the step; with one worker's gradient alone the signs disagree far more often.
    (sum(graph) / sum(counts)).backward()
    trained = load_causal_lm(out / "model").state_dict()
    agree = total = 0
    for name, p in model.named_parameters():
        moved, g = trained[name] - p.detach(), p.grad
        sure = g.abs() > 1e-6
        agree += int((torch.sign(moved[sure]) == -torch.sign(g[sure])).sum())
        total += int(sure.sum())
    assert total > 0 and agree / total > 0.999, (agree, total)


def _train_worker_pids() -> list[int]:
    """Ray Train workers of this test session's cluster only (its raylet is our child), not other runs'."""
    import psutil

    pids = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if "RayTrainWorker" in cmd and any(a.pid == me for a in p.parents()):
                pids.append(p.info["pid"])
        except psutil.NoSuchProcess:
            continue
    return pids


def kill_a_worker_after(out: Path, step: int, checkpoints: Path | None = None) -> dict:
    """Start a thread that SIGKILLs one Ray Train worker once `step` is logged and a checkpoint exists."""
    killed: dict = {}

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline:
            rows = metrics(out) if (out / "metrics.jsonl").exists() else []
            ckpts = list((checkpoints or out / "checkpoints").glob("*/checkpoint_*"))
            if ckpts and rows and rows[-1]["step"] >= step:
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["step"], killed["pid"] = rows[-1]["step"], pids[-1]
                    return
            time.sleep(0.2)

    killed["thread"] = threading.Thread(target=killer, daemon=True)
    killed["thread"].start()
    return killed


@pytest.mark.e2e
def test_resume_after_crash_continues_step_count_schedule_and_data(ray_session, cli, repo, tmp_path, reference_zero2):
    """A run that dies (no retries left, a fixed worker count) stops with one line naming resume_from and
    exit status 1, and is continued with resume_from: OUT. Its checkpoints live on "remote" storage given
    as a URI (storage_path: file://... stands for s3:// here), not under OUT."""
    import yaml

    out, store = tmp_path / "out", tmp_path / "shared-storage"
    killed = kill_a_worker_after(out, 6, checkpoints=store)
    sets = {"train.save_steps": 4, "storage_path": f"file://{store}"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(make_cfg(repo, out, **sets).model_dump(mode="json")))
    result = cli("finetune", "--config", str(tmp_path / "cfg.yaml"))
    killed["thread"].join(timeout=5)
    assert 6 <= killed["step"] < 16
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-4000:]
    assert "training stopped" in lines[0] and f"resume_from={out}" in lines[0] and "num_workers: [MIN, MAX]" in lines[0]
    assert not any(line.startswith("Traceback") for line in result.stderr.splitlines())  # (worker logs may have theirs)
    assert list(store.glob("out-*/checkpoint_*")) and not (out / "checkpoints").exists()
    assert not (out / "run.json").exists()
    run = run_finetune(make_cfg(repo, out, resume_from=str(out), **sets))
    assert run["resumed_from"].startswith(f"file://{store}/out-") and run["final"]["step"] == 16
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))  # continued in place, no step logged twice
    ref = {r["step"]: r for r in metrics(reference_zero2)}
    # Same schedule as the uninterrupted run: scheduler and step count were restored.
    assert all(r["lr"] == pytest.approx(ref[r["step"]]["lr"], rel=1e-6) for r in rows)
    assert rows[-1]["loss"] == pytest.approx(ref[16]["loss"], rel=0.15)
    check_saved_model(out, checkpoints=store)


@pytest.mark.e2e
def test_worker_killed_midrun_restarts_from_checkpoint(ray_session, repo, tmp_path, reference_zero2, monkeypatch):
    """... and the experiment trackers (`logging:`) go on in the same runs after the restart."""
    from mlflow.tracking import MlflowClient
    from test_tracking import tensorboard_scalars

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 reads its file store only when asked

    out = tmp_path / "out"
    killed = kill_a_worker_after(out, 9)
    run = run_finetune(make_cfg(repo, out, max_failures=2, **{"logging.tensorboard": "true",
                                                               "logging.mlflow": str(tmp_path / "mlruns")}))
    killed["thread"].join(timeout=5)
    assert 9 <= killed.get("step", 0) < 16, "no train worker was killed mid-run"
    assert run["final"]["step"] == 16
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    ref_final = metrics(reference_zero2)[-1]["loss"]
    assert rows[-1]["loss"] == pytest.approx(ref_final, rel=0.15)
    check_saved_model(out)

    loss = {r["step"]: r["loss"] for r in rows}
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [mlrun] = client.search_runs([client.get_experiment_by_name("lmflow-ray").experiment_id])
    assert mlrun.info.status == "FINISHED"  # one run, closed by the restarted rank 0
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "loss")}  # the last value per step
    assert history == pytest.approx(loss)
    tb = {step: value for tag, step, value in tensorboard_scalars(out / "tensorboard") if tag == "loss"}
    assert tb == pytest.approx(loss, rel=1e-6)


def test_lisa_trains_sampled_layers_with_heldout_eval(ray_session, repo, tmp_path, tiny_llama):
    out = tmp_path / "out"
    run = run_finetune(make_cfg(repo, out, deepspeed="zero0", **{
        "scaling.num_workers": 1, "train.num_epochs": 2, "train.global_batch_size": 8, "lisa.enabled": "true",
        "lisa.active_layers": 1, "lisa.interval_steps": 5, "train.save_steps": 0, "data.eval_split": 0.125,
        "train.eval_steps": 10}))
    assert run["data"]["eval_rows"] == 32 and run["data"]["rows"] == 224
    rows = metrics(out)
    assert_loss_falls(rows, 0.8)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 7 and evals[-1] < 0.8 * evals[0]  # before training (step 0), steps 10..50 and the last (56)
    sampled = {tuple(r["lisa_layers"]) for r in rows if "loss" in r}
    assert all(len(s) == 1 for s in sampled) and len(sampled) >= 1
    check_saved_model(out)


def test_lora_adapter_saves_and_merges(ray_session, repo, tmp_path, tiny_llama):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from lmflow_ray.models.peft_utils import merge_lora

    out = tmp_path / "out"
    modules = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    run_finetune(make_cfg(repo, out, **{"scaling.num_workers": 1, "train.num_epochs": 2, "train.global_batch_size": 8,
                                        "lora.enabled": "true", "lora.r": 8, "train.save_steps": 0, "train.lr": 3e-2,
                                        "lora.target_modules": modules}))
    assert (out / "model" / "adapter_config.json").is_file()
    assert not (out / "model" / "model.safetensors").exists()  # only the adapter is saved
    # A random tiny model with frozen random embeddings/head learns slowly through LoRA alone; the
    # SmolLM2 LoRA test (test_lora_smollm2.py) is the one that shows a task being learned.
    assert_loss_falls(metrics(out), 0.98)
    merged_dir = merge_lora(str(tiny_llama), str(out), str(tmp_path / "merged"))
    probe = torch.load(out / "save_check.pt")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        a = peft_model(input_ids=probe["input_ids"]).logits
        b = merged(input_ids=probe["input_ids"]).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a, probe["logits"], atol=1e-5)
