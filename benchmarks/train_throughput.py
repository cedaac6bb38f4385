"""SFT training throughput: `lmflow-ray finetune` (packed) vs TRL's SFTTrainer (packed) and a plain transformers.Trainer.

Both sides train the same model on the same generated conversation set (fixed seed,
assistant answers from a few words to ~200 tokens), tokenized by the same
`tokenize_conversation` (the model's own chat template), for one epoch, fp32, AdamW with
the same lr, cosine schedule, clipping 1.0, the same number of torch threads.

- project: `run_finetune` with 1 worker, ZeRO-0, `data.packing: true`, blocks of
  `--max-length` tokens, `--micro-batch` blocks per step.
- baseline: `transformers.Trainer` with `DataCollatorForSeq2Seq(padding=True)` (pad to the
  longest sample of each batch), no packing, `per_device_train_batch_size` = samples per
  project step (so both see the same real tokens per step and in total). It runs in a
  subprocess of this script so its peak RSS is its own.

- trl: TRL's `SFTTrainer` with `packing=True` (its best-fit-decreasing packing, padding-free
  with per-sample position ids, as TRL documents for packing) on the same pre-tokenized samples
  (`input_ids` + `completion_mask` from our labels, so the same tokens are learned),
  `per_device_train_batch_size` = the project's blocks per step, same lr / schedule / clipping,
  in its own subprocess (`--trl`; needs the `bench` extra: `pip install -e '.[bench]'`).

Each peer saves its trained model at the end (`trainer.save_model`), as the project writes OUT/model.

Figures: real (non-padding) tokens per second of training-loop time (project: the
dataset's real tokens / `elapsed_s` of the last metrics row; baseline: the same tokens /
`train_runtime`), padding waste (pad positions / all positions processed), peak RSS of the
training process, and the ratio project / baseline.

The machine this was written on is shared and its load drifts by minutes, which can swing
two back-to-back runs either way; `interleaved_packing_only` is a cross-check that
alternates a packed and a padded training step in one process (no Ray, DeepSpeed or
Trainer), so drift hits both sides alike. Compare ratios from one run, not absolute figures
across runs. Prints one JSON object on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"smollm2": "smollm2-135m-instruct", "tiny-llama": "tiny-llama"}
WORDS = (
    "the a model data train token learn answer question value system network layer weight "
    "gradient batch sample memory compute fast slow large small first last good better "
    "simple clear result method paper test check run step loss rate time space graph node "
    "edge tree list map set key code file line error output input text word sentence "
    "language english french city river mountain history science music art number because "
    "however therefore example instance often usually rarely always never and or but with "
    "from into over under between after before during while where when which what how why"
).split()
TOPICS = ("gradient descent", "the water cycle", "binary search", "photosynthesis", "packing in training",
          "the french revolution", "hash maps", "tokenization", "rainbows", "compound interest")


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_conversations(n: int, seed: int = 0, max_answer_words: int = 200) -> list[dict]:
    """`n` single-turn conversations; answer length uniform in words from 2 to `max_answer_words`
    (about a token a word with SmolLM2's tokenizer)."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        question = f"Explain {rng.choice(TOPICS)}. " + _sentence(rng, rng.randint(3, 25))
        words, parts = rng.randint(2, max_answer_words), []
        while words > 0:
            k = min(words, rng.randint(6, 18))
            parts.append(_sentence(rng, k))
            words -= k
        convs.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": " ".join(parts)}]})
    return convs


def tokenize_all(convs: list[dict], model_path: str, max_length: int) -> list[dict]:
    """The training examples both sides use (normalised as the reader does, then tokenized)."""
    from lmflow_ray.data.formats import normalize
    from lmflow_ray.data.tokenize import tokenize_conversation
    from lmflow_ray.models.loading import load_tokenizer

    tok = load_tokenizer(model_path)
    return [tokenize_conversation(normalize("conversation", c), tok, None, max_length) for c in convs]


def write_dataset(convs: list[dict], path: Path) -> None:
    path.write_text(json.dumps({"type": "conversation", "instances": convs}))


def packed_blocks(examples: list[dict], block: int) -> list[dict]:
    """The blocks the project trains on: the same `pack_sequences` call its Ray Data stage makes."""
    from lmflow_ray.data.packing import pack_sequences

    return pack_sequences(examples, block)


def real_in_block(block: dict) -> int:
    """Non-padding positions of a packed block (its tail is PAD_ID; main() checks the total)."""
    from lmflow_ray.data.packing import PAD_ID

    return sum(1 for t in block["input_ids"] if t != PAD_ID)


def fit_to_micro_batch(convs: list[dict], examples: list[dict], block: int, micro: int):
    """Drop trailing conversations until the packed block count divides by the micro batch, so the
    project (which drops an incomplete last micro-batch) trains on every sample the baseline sees."""
    while len(packed_blocks(examples, block)) % micro:
        convs, examples = convs[:-1], examples[:-1]
    return convs, examples


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)
    return {"min": s[0], "median": s[len(s) // 2], "mean": round(sum(s) / len(s), 1), "p90": s[int(0.9 * len(s))],
            "max": s[-1]}


def run_project(model: str, data: Path, out: Path, args) -> dict:
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune

    base = {
        "model": model,
        "data": {"path": str(data), "max_length": args.max_length, "packing": True},
        "output_dir": str(out),
        "deepspeed": "zero0",
        "seed": args.seed,
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
        "train": {"num_epochs": 1, "micro_batch_size": args.micro_batch, "lr": args.lr, "lr_scheduler": "cosine",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "dtype": "float32", "logging_steps": 1,
                  "save_steps": 0, "gradient_checkpointing": args.gradient_checkpointing},
    }
    wall = time.time()
    run = run_finetune(load_config(FinetuneConfig, None, [], base=base))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"run": run, "rows": rows, "wall_s": time.time() - wall}


def baseline_main(spec_path: str) -> None:
    """Subprocess entry: train with transformers.Trainer, write figures to spec['result']."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lmflow_ray.models.loading import load_tokenizer

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["model_path"])
    examples = [{**e, "attention_mask": [1] * len(e["input_ids"])} for e in spec["examples"]]
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counts = {"positions": 0, "real": 0, "batches": 0}

    def counting_collator(features):
        batch = collator(features)
        counts["positions"] += batch["input_ids"].numel()
        counts["real"] += int(batch["attention_mask"].sum())
        counts["batches"] += 1
        return batch

    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, use_safetensors=True)
    targs = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", use_cpu=True, bf16=False,
        fp16=False, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=spec["seed"],
        dataloader_num_workers=0, dataloader_drop_last=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(examples), data_collator=counting_collator)
    result = trainer.train()
    trainer.save_model(spec["output_dir"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "train_runtime_s": result.metrics["train_runtime"], "steps": result.global_step, "pad_counts": counts,
        "mean_loss": sum(losses) / max(len(losses), 1), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def trl_main(spec_path: str) -> None:
    """Subprocess entry: train with TRL's SFTTrainer (packing), write figures to spec['result']."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lmflow_ray.models.loading import load_tokenizer

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["model_path"])
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
            for e in spec["examples"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, use_safetensors=True)
    cfg = SFTConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", use_cpu=True, bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0, packing=True, max_length=spec["max_length"],
        completion_only_loss=True,
        # TRL's SFTConfig turns activation checkpointing on by default (TRL 1.16); the project's default is off.
        # Both sides get the same setting (--gradient-checkpointing), or the memory and speed compare two methods.
        gradient_checkpointing=spec["gradient_checkpointing"],
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    packed = trainer.train_dataset
    positions = sum(len(x) for x in packed["input_ids"])
    result = trainer.train()
    trainer.save_model(spec["output_dir"])  # the run's product, as the project's side writes OUT/model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["result"]).write_text(json.dumps({
        "train_runtime_s": result.metrics["train_runtime"], "steps": result.global_step,
        "packed_sequences": len(packed), "packed_positions": positions,
        "mean_loss": sum(losses) / max(len(losses), 1), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def _run_side(flag: str, name: str, spec: dict, tmp: Path, threads: int) -> dict:
    """One peer's training in a subprocess of this script (its peak RSS is its own): its figures + wall_s."""
    spec = {**spec, "result": str(tmp / f"{name}.json")}
    (tmp / f"{name}_spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    wall = time.time()
    subprocess.run([sys.executable, __file__, flag, str(tmp / f"{name}_spec.json")], check=True, env=env,
                   stdout=sys.stderr)
    return {**json.loads((tmp / f"{name}.json").read_text()), "wall_s": time.time() - wall}


def run_trl(model_path: str, examples: list[dict], blocks_per_step: int, tmp: Path, args) -> dict:
    return _run_side("--trl-spec", "trl", {
        "model_path": model_path, "examples": examples, "batch_size": blocks_per_step, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "output_dir": str(tmp / "trl_out"), "max_length": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing},
        tmp, args.threads)


def run_baseline(model_path: str, examples: list[dict], batch_size: int, tmp: Path, args) -> dict:
    return _run_side("--baseline-spec", "baseline", {
        "model_path": model_path, "examples": examples, "batch_size": batch_size, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "output_dir": str(tmp / "hf_out")}, tmp, args.threads)


def interleaved_check(model_path: str, examples: list[dict], blocks: list[dict], micro: int, batch_size: int,
                      pairs: int, args) -> dict:
    """Packing alone, robust to a machine whose load drifts: one process, one model, alternating a
    packed step (the project's collate + token_nll_sum) with a padded step (the baseline's
    DataCollatorForSeq2Seq + the model's own loss), each forward + backward + AdamW step.
    No Ray, no DeepSpeed, no Trainer: the ratio is what packing buys on this data."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from lmflow_ray.data.collate import collate
    from lmflow_ray.models.loading import load_tokenizer
    from lmflow_ray.models.scoring import token_nll_sum

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    pad_collator = DataCollatorForSeq2Seq(load_tokenizer(model_path), padding=True)
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)

    def packed(i: int) -> tuple[float, int]:
        rows = blocks[micro * i: micro * (i + 1)]
        batch = collate({k: [r[k] for r in rows] for k in rows[0]}, 0)
        t = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        nll, n = token_nll_sum(logits, batch["labels"])
        (nll / n).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t, sum(real_in_block(r) for r in rows)

    def padded(i: int) -> tuple[float, int]:
        rows = [examples[j] for j in order[batch_size * i: batch_size * (i + 1)]]
        batch = pad_collator([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
        t = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t, sum(len(r["input_ids"]) for r in rows)

    packed(0), padded(0)  # warm-up: first-step allocations
    totals = {"packed": [0.0, 0], "padded": [0.0, 0]}
    pair_ratios = []
    for i in range(1, pairs + 1):
        rate = {}
        for name, step in (("packed", packed), ("padded", padded)):
            dt, real = step(i)
            totals[name][0] += dt
            totals[name][1] += real
            rate[name] = real / dt
        pair_ratios.append(rate["packed"] / rate["padded"])
    rates = {k: v[1] / v[0] for k, v in totals.items()}
    # A burst of load from other processes hits single steps: the median pair resists it.
    return {"pairs": pairs, "packed_real_tokens_per_s": round(rates["packed"], 2),
            "padded_real_tokens_per_s": round(rates["padded"], 2),
            "ratio": round(rates["packed"] / rates["padded"], 3),
            "median_pair_ratio": round(statistics.median(pair_ratios), 3)}


def versions() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    return {"torch": torch.__version__, "ray": ray.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "mem_gib": round(mem, 1), "date": time.strftime("%Y-%m-%d")}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--samples", type=int, default=64, help="conversations generated (fewer if trimmed to fit blocks)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleaved-pairs", type=int, default=4,
                   help="packed/padded step pairs of the in-process cross-check (0: skip it)")
    # 1 by default: on a shared machine, 2 OpenMP threads on 2 cores stall whenever another process
    # runs (steps seen 50x slower than with 1 thread), which would swamp the comparison.
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing on the project's and TRL's side (TRL's own default is on; off here "
                        "unless given, as the project's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--sides", default="project,trl,baseline", help="which of project, trl, baseline to run")
    args = p.parse_args()

    from lmflow_ray.models.zoo import fetch_model

    model_path = str(fetch_model(MODELS[args.model]))
    convs = make_conversations(args.samples, args.seed)
    examples = tokenize_all(convs, model_path, args.max_length)
    convs, examples = fit_to_micro_batch(convs, examples, args.max_length, args.micro_batch)
    lengths = [len(e["input_ids"]) for e in examples]
    real_tokens = sum(lengths)
    blocks = packed_blocks(examples, args.max_length)
    if sum(real_in_block(b) for b in blocks) != real_tokens:
        raise SystemExit("packed blocks do not hold exactly the dataset's tokens (pad id used by the data?)")
    project_steps = len(blocks) // args.micro_batch
    batch_size = max(1, round(len(examples) / project_steps))

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmpdir:
        tmp = Path(tmpdir)
        write_dataset(convs, tmp / "sft.json")
        sides = set(args.sides.split(","))
        load_before = os.getloadavg()[0]
        proj = run_project(MODELS[args.model], tmp / "sft.json", tmp / "project", args)
        import ray

        ray.shutdown()  # its daemons and idle workers would otherwise share the cores with the baseline
        load_mid = os.getloadavg()[0]
        peer = run_trl(model_path, examples, args.micro_batch, tmp, args) if "trl" in sides else None
        base = run_baseline(model_path, examples, batch_size, tmp, args) if "baseline" in sides else None
        load_after = os.getloadavg()[0]
    check = interleaved_check(model_path, examples, blocks, args.micro_batch, batch_size,
                              min(args.interleaved_pairs, project_steps - 1), args) if args.interleaved_pairs else None

    last = proj["rows"][-1]
    project_positions = len(blocks) * args.max_length
    project = {
        "rows_packed": proj["run"]["data"]["rows"], "rows_expected": len(blocks), "steps": last["step"],
        "positions_per_step": args.micro_batch * args.max_length,
        "elapsed_s": round(last["elapsed_s"], 1), "wall_s_incl_startup_and_save": round(proj["wall_s"], 1),
        "real_tokens_per_s": round(real_tokens / last["elapsed_s"], 2),
        "padding_waste_pct": round(100 * (project_positions - real_tokens) / project_positions, 1),
        "max_rss_mb": round(max(r["max_rss_mb"] for r in proj["rows"]), 0),
        "first_loss": round(proj["rows"][0]["loss"], 4), "last_loss": round(last["loss"], 4),
        "mean_loss": round(sum(r["loss"] for r in proj["rows"]) / len(proj["rows"]), 4),
    }
    baseline = trl = None
    if base:
        pc = base["pad_counts"]
        baseline = {
            "per_device_train_batch_size": batch_size, "steps": base["steps"],
            "train_runtime_s": round(base["train_runtime_s"], 1), "wall_s_incl_startup": round(base["wall_s"], 1),
            "real_tokens_per_s": round(real_tokens / base["train_runtime_s"], 2),
            "padding_waste_pct": round(100 * (pc["positions"] - pc["real"]) / pc["positions"], 1),
            "positions_processed": pc["positions"], "real_tokens_collated": pc["real"],
            "max_rss_mb": round(base["max_rss_mb"], 0),
            "first_loss": round(base["first_loss"], 4), "last_loss": round(base["last_loss"], 4),
            "mean_loss": round(base["mean_loss"], 4),
        }
    if peer:
        trl = {
            "settings": {"packing": True, "packing_strategy": "bfd (padding-free)", "completion_only_loss": True,
                         "per_device_train_batch_size": args.micro_batch, "max_length": args.max_length,
                         "gradient_checkpointing": args.gradient_checkpointing},
            "steps": peer["steps"], "packed_sequences": peer["packed_sequences"],
            "train_runtime_s": round(peer["train_runtime_s"], 1), "wall_s_incl_startup": round(peer["wall_s"], 1),
            "real_tokens_per_s": round(real_tokens / peer["train_runtime_s"], 2),
            "max_rss_mb": round(peer["max_rss_mb"], 0),
            "first_loss": round(peer["first_loss"], 4), "last_loss": round(peer["last_loss"], 4),
            "mean_loss": round(peer["mean_loss"], 4),
        }

    def ratios(other: dict | None) -> dict | None:
        if not other:
            return None
        return {"tokens_per_s": round(project["real_tokens_per_s"] / other["real_tokens_per_s"], 3),
                "wall_s": round(other["wall_s_incl_startup"] / project["wall_s_incl_startup_and_save"], 3),
                "max_rss": round(project["max_rss_mb"] / other["max_rss_mb"], 3)}

    return {
        "benchmark": "train_throughput", "model": MODELS[args.model], "samples": len(examples),
        "real_tokens": real_tokens, "sample_tokens": length_stats(lengths), "max_length": args.max_length,
        "micro_batch_blocks": args.micro_batch, "threads": args.threads, "lr": args.lr, "gradient_checkpointing": args.gradient_checkpointing,
        "project": project, "trl": trl, "baseline": baseline,
        # ours / theirs for tokens/s and RSS; theirs / ours for wall time (> 1: we finish sooner)
        "ratio_vs_trl": ratios(trl), "ratio_vs_baseline": ratios(baseline),
        "goal_ratio_vs_baseline_tokens_per_s": 1.3, "goal_ratio_vs_trl_wall": 1.2,
        "interleaved_packing_only": check,
        "load_avg_1m": {"before": load_before, "between": load_mid, "after": load_after},
        "machine": machine(), "versions": versions(),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-spec":
        baseline_main(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-spec":
        trl_main(sys.argv[2])
        sys.exit(0)
    # Ray, DeepSpeed and the training loop print progress on fd 1; keep stdout for the JSON alone.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    result = main()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
