"""`lmflow-ray eval`: the one evaluation command.

Two kinds of metrics (`--metrics`, comma-separated):

- Generated answers (through the engine interface, `--engine hf|vllm`, inference/engine.py):
  reward (needs `--reward`, a reward model dir or `module:function`), response_ppl (the model's
  perplexity of its own answers given the prompts), msttr, distinct, unique, length (metrics.py),
  and accuracy on text2text / conversation data (exact match of the answer with the reference
  after scoring.normalize_answer).
- The dataset's own text, scored by the model without generating (scoring.py): nll and ppl of
  the learned tokens (masked as training masks them), and accuracy on multiple_choice data
  (acc and acc_norm, as lm-evaluation-harness scores multiple choice).

OUT is a JSON report: the model's identity (path, base and adapter, a fingerprint of its files),
the data files' sha256, each metric with the count it is over, the settings, and every sample's
details; written atomically, never over an existing file. `summary_line` gives the console's one
line; `compare` sets two reports side by side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from lmflow_ray.errors import UserError

GENERATION_METRICS = ("reward", "response_ppl", "msttr", "distinct", "unique", "length")
SCORING_METRICS = ("nll", "ppl")
METRICS = GENERATION_METRICS + SCORING_METRICS + ("accuracy",)


def read_instances(data: str | Path, load: bool = True) -> tuple[str, list[dict], list[Path]]:
    """(dataset type, raw instances (none unless `load`), its files) of a validated eval dataset."""
    from lmflow_ray.data.source import resolve, validate

    summary = validate(data)
    if summary.type not in ("conversation", "text2text", "text_only", "multiple_choice"):
        raise UserError(f"{data}: eval reads conversation, text2text, text_only or multiple_choice data, "
                        f"not '{summary.type}'")
    src = resolve(data)
    return src.type, list(src.instances()) if load else [], src.files


def file_hashes(files: list[Path]) -> dict[str, str]:
    """{file: sha256}, read in 1 MiB chunks."""
    hashes = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        hashes[str(f)] = h.hexdigest()
    return hashes


def read_prompts(data: str | Path) -> tuple[str, list]:
    """(dataset type, raw prompts): message lists for conversations, strings otherwise."""
    from lmflow_ray.data.formats import prompt_of

    dtype, insts, _ = read_instances(data)
    return dtype, [prompt_of(dtype, inst) for inst in insts]


def model_identity(model: str) -> dict:
    """What was evaluated: the name given, the resolved dir, base and adapter for a LoRA adapter dir,
    and a fingerprint (sha256 of the config files' contents and every file's name and size)."""
    from lmflow_ray.models.zoo import base_and_adapter

    base, adapter = base_and_adapter(str(model))
    path = adapter or base
    h = hashlib.sha256()
    for d in [base] + ([adapter] if adapter else []):
        for f in sorted(p for p in Path(d).iterdir() if p.is_file()):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
            if f.suffix == ".json" and f.stat().st_size < 1 << 20:
                h.update(f.read_bytes())
    return {"name": str(model), "path": str(path), "base": str(base), "adapter": str(adapter) if adapter else None,
            "fingerprint": h.hexdigest()[:16]}


def response_perplexity(model, tokenizer, prompt_texts: list[str], responses: list[str], chat: bool) -> float:
    """exp(mean NLL of the response tokens given the prompt), over all responses' tokens."""
    import torch

    from lmflow_ray.models.scoring import token_nll_sum

    total, count = 0.0, 0
    for p, r in zip(prompt_texts, responses):
        p_ids = tokenizer(p, add_special_tokens=not chat)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"]
        if not r_ids:
            continue
        ids = torch.tensor([p_ids + r_ids], device=model.device)
        labels = torch.tensor([[-100] * len(p_ids) + r_ids], device=model.device)
        with torch.no_grad():
            nll, n = token_nll_sum(model(input_ids=ids).logits, labels)
        total, count = total + float(nll), count + int(n)
    return math.exp(total / count) if count else float("nan")


def evaluate(model: str, data: str, metrics: list[str], out: str | Path, reward: str | None = None,
             engine: str = "hf", params=None, template: str | None = None, batch_size: int = 16,
             max_length: int | None = None, workers: int = 0) -> dict:
    from lmflow_ray.data.formats import normalize, prompt_of
    from lmflow_ray.eval import scoring
    from lmflow_ray.models.zoo import resolve_model

    if not metrics:
        raise UserError(f"--metrics is empty; give one or more of {', '.join(METRICS)}, comma-separated")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    resolve_model(model)  # a bad --model is named first, before what depends on it
    if "reward" in metrics and not reward:
        raise UserError("--metrics reward needs --reward (a reward model dir or module:function)")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass another --out or remove it (eval never overwrites)")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    dtype, insts, files = read_instances(data, load=not workers)
    if workers and (set(metrics) & set(GENERATION_METRICS) or ("accuracy" in metrics and dtype != "multiple_choice")):
        raise UserError("--workers N distributes nll, ppl and multiple-choice accuracy (the data scored by the model); "
                        "metrics of generated answers run in one process (answers for a large file: "
                        "lmflow-ray infer --workers N)")
    if not insts and not workers:
        raise UserError(f"{data}: no instances")
    if dtype == "multiple_choice":
        wrong = [m for m in metrics if m != "accuracy"]
        if wrong:
            raise UserError(f"{data}: multiple_choice data is scored by --metrics accuracy only (not {', '.join(wrong)})")
    if set(metrics) & set(SCORING_METRICS) and dtype == "conversation" and insts \
            and not any(m.get("role") == "assistant" for i in insts for m in i["messages"]):
        raise UserError(f"{data}: --metrics nll/ppl score the assistant turns, and these conversations have none "
                        "(for prompts only, use response_ppl: the perplexity of the model's own answers)")
    samples: list[dict] = [{} for _ in insts]
    report: dict = {}
    counts: dict = {}
    result = {"model": str(model), "identity": model_identity(model), "data": str(data), "data_sha256": file_hashes(files),
              "type": dtype, "instances": len(insts)}

    generate = set(metrics) & set(GENERATION_METRICS) or ("accuracy" in metrics and dtype != "multiple_choice")
    if generate:
        prompts = [prompt_of(dtype, i) for i in insts]
        responses, texts, rewards, gen_model = _generate(model, dtype, prompts, metrics, reward, engine, params,
                                                         template, batch_size, report, result)
        for smp, t, r in zip(samples, texts, responses):
            smp.update(input=t, output=r)
        if rewards is not None:
            for smp, rw in zip(samples, rewards):
                smp["reward"] = rw
            report["reward"], counts["reward"] = sum(rewards) / len(rewards), len(rewards)
        if "accuracy" in metrics:
            refs = [scoring.reference_of(dtype, i) for i in insts]
            hits = [r is not None and scoring.normalize_answer(a) == scoring.normalize_answer(r)
                    for a, r in zip(responses, refs)]
            for smp, r, hit in zip(samples, refs, hits):
                smp.update(reference=r, correct=hit)
            counted = sum(r is not None for r in refs)
            report["exact_match"], counts["exact_match"] = sum(hits) / max(counted, 1), counted
        for m in ("response_ppl", "msttr-100", "distinct-1", "distinct-2", "unique-1", "unique-2", "length"):
            if m in report:
                counts[m] = len(responses)
    else:
        gen_model = None

    if set(metrics) & set(SCORING_METRICS) or (dtype == "multiple_choice" and "accuracy" in metrics):
        t0 = time.time()
        if workers:  # rows stream from Ray Data through `workers` model actors, in dataset order
            scored = list(scoring.score_with_ray(model, data, dtype, template, max_length, batch_size, workers))
            rows = [r for r, _ in scored]
            samples = [{} for _ in rows]
            result["instances"] = len(rows)
        else:
            from lmflow_ray.models.loading import load_for_generation

            lm, tok = gen_model or load_for_generation(model)
            rows = [normalize(dtype, i) for i in insts]
            if dtype == "multiple_choice":
                scored = list(zip(rows, scoring.choice_loglikelihoods(lm, tok, rows, batch_size)))
            else:
                scored = list(zip(rows, scoring.dataset_nll(lm, tok, dtype, rows, template, max_length, batch_size)))
        if not rows:
            raise UserError(f"{data}: no instances")
        if dtype == "multiple_choice":
            acc, details = scoring.multiple_choice_accuracy(rows, [ll for _, ll in scored])
            report.update(acc), counts.update(acc=len(rows), acc_norm=len(rows))
            for smp, d in zip(samples, details):
                smp.update(d)
        else:
            total, tokens = sum(n for _, (n, _) in scored), sum(c for _, (_, c) in scored)
            if tokens == 0:
                raise UserError(f"{data}: no tokens to score (every instance's learned part is empty)")
            if "nll" in metrics:
                report["nll"], counts["nll"] = total / tokens, tokens
            if "ppl" in metrics:
                report["ppl"], counts["ppl"] = math.exp(total / tokens), tokens
            for smp, (_, (n, c)) in zip(samples, scored):
                smp.update(nll_sum=n, tokens=c)
        print(f"[lmflow-ray] eval: scored {len(rows)} instances ({time.time() - t0:.0f} s"
              + (f", {workers} workers)" if workers else ")"), file=sys.stderr, flush=True)

    result.update(metrics=report, counts=counts, samples=samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    os.replace(tmp, out)
    return result


def _generate(model, dtype, prompts, metrics, reward, engine, params, template, batch_size, report, result):
    """Answers to every prompt, and the metrics of answers (into `report`). Returns (responses, prompt texts,
    per-answer rewards or None, (model, tokenizer) when the HF engine's model can score the dataset afterwards)."""
    from lmflow_ray.eval.metrics import diversity
    from lmflow_ray.inference import SamplingParams, make_engine

    scorer = None
    if reward:
        from lmflow_ray.eval.reward import RewardScorer

        scorer = RewardScorer.load(reward)  # fail on a bad --reward before generating
    params = params or SamplingParams(max_tokens=128)
    kw = {"max_batch_size": batch_size} if engine == "hf" else {}
    eng = make_engine(engine, model, template=template, **kw)
    chat = dtype == "conversation"
    texts = [eng.chat_prompt(p) if chat else p for p in prompts]
    t0 = time.time()
    responses: list[str] = []
    for i in range(0, len(texts), batch_size):
        responses += [g[0].text for g in eng.generate(texts[i:i + batch_size], params, add_special_tokens=not chat)]
        print(f"[lmflow-ray] eval: generated {len(responses)}/{len(texts)} ({time.time() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    rewards = scorer.score(prompts, responses) if scorer and "reward" in metrics else None
    hf = (eng.model, eng.tokenizer) if engine == "hf" else None
    if "response_ppl" in metrics:
        if hf is None:
            from lmflow_ray.models.loading import load_for_generation

            hf = load_for_generation(model)
        report["response_ppl"] = response_perplexity(*hf, texts, responses, chat)
    div = diversity(responses)
    for m in metrics:
        if m == "msttr":
            report["msttr-100"] = div["msttr-100"]
        elif m in ("distinct", "unique"):
            report[f"{m}-1"], report[f"{m}-2"] = div[f"{m}-1"], div[f"{m}-2"]
        elif m == "length":
            report["length"] = div["length"]
    result.update(engine=engine, reward_source=reward,
                  sampling={"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                            "seed": params.seed})
    return responses, texts, rewards, hf


def summary_line(result: dict, path: str | os.PathLike) -> str:
    """One console line for a report: its metrics, the instance count and where the report is."""
    values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items())
    return f"[lmflow-ray] eval of {result['model']} on {result['instances']} instances: {values} (report: {path})"


def _load_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--compare {path}: not a readable eval report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise UserError(f"--compare {path}: not an eval report (no 'metrics'); give two files `lmflow-ray eval --out` wrote")
    return report


def compare(a: str, b: str) -> str:
    """Two reports side by side: each metric of either, its value in A and B, and B - A."""
    ra, rb = _load_report(a), _load_report(b)
    names = list(ra["metrics"]) + [k for k in rb["metrics"] if k not in ra["metrics"]]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    rows = [("metric", "A", "B", "B - A")]
    for k in names:
        va, vb = ra["metrics"].get(k), rb["metrics"].get(k)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append((k, fmt(va), fmt(vb), "-" if delta is None else f"{delta:+.4f}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"A: {a} ({ra.get('model')}, {ra.get('instances', ra.get('prompts'))} instances of {ra.get('data')})",
             f"B: {b} ({rb.get('model')}, {rb.get('instances', rb.get('prompts'))} instances of {rb.get('data')})"]
    if ra.get("data_sha256") and rb.get("data_sha256") and ra["data_sha256"] != rb["data_sha256"]:
        lines.append("note: the two reports are over different data (their files' sha256 differ)")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    return "\n".join(lines)
