"""`lmflow-ray eval`: generate responses to a prompt file and report alignment metrics.

Generation goes through the engine interface (`--engine hf|vllm`, inference/engine.py).
Prompts: a conversation's turns up to its last user turn, a text2text `input`, or a
text_only `text`. Metrics (`--metrics`, comma-separated): reward (needs `--reward`, a reward
model dir or `module:function`), ppl (the evaluated model's perplexity of its own responses
given the prompts, computed with transformers), msttr, distinct, unique, length (see
metrics.py). OUT is a JSON report: the metrics, the settings, and every (input, output,
reward) sample; written atomically, never over an existing file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from lmflow_ray.errors import UserError

METRICS = ("reward", "ppl", "msttr", "distinct", "unique", "length")


def read_prompts(data: str | Path) -> tuple[str, list]:
    """(dataset type, raw prompts): message lists for conversations, strings otherwise."""
    from lmflow_ray.data.formats import prompt_of
    from lmflow_ray.data.source import dataset_type, iter_instances, validate

    summary = validate(data)
    if summary.type not in ("conversation", "text2text", "text_only"):
        raise UserError(f"{data}: eval reads conversation, text2text or text_only prompts, not '{summary.type}'")
    dtype, files = dataset_type(data)
    return dtype, [prompt_of(dtype, inst) for f in files for _, _, inst in iter_instances(f)]


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
             engine: str = "hf", params=None, template: str | None = None, batch_size: int = 16) -> dict:
    from lmflow_ray.eval.metrics import diversity
    from lmflow_ray.inference import SamplingParams, make_engine
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
    dtype, prompts = read_prompts(data)
    if not prompts:
        raise UserError(f"{data}: no prompts")
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
    report: dict = {}
    rewards = scorer.score(prompts, responses) if scorer and "reward" in metrics else None
    if rewards is not None:
        report["reward"] = sum(rewards) / len(rewards)
    if "ppl" in metrics:
        if engine == "hf":
            lm, tok = eng.model, eng.tokenizer
        else:
            from lmflow_ray.models.loading import load_for_generation

            lm, tok = load_for_generation(model)
        report["ppl"] = response_perplexity(lm, tok, texts, responses, chat)
    div = diversity(responses)
    for m in metrics:
        if m == "msttr":
            report["msttr-100"] = div["msttr-100"]
        elif m in ("distinct", "unique"):
            report[f"{m}-1"], report[f"{m}-2"] = div[f"{m}-1"], div[f"{m}-2"]
        elif m == "length":
            report["length"] = div["length"]
    result = {"model": str(model), "data": str(data), "engine": engine, "reward_source": reward,
              "sampling": {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                           "seed": params.seed},
              "prompts": len(prompts), "metrics": report,
              "samples": [{"input": t, "output": r, **({"reward": rw} if rewards is not None else {})}
                          for t, r, rw in zip(texts, responses, rewards or [None] * len(texts))]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    os.replace(tmp, out)
    return result


def summary_line(result: dict, path: str | os.PathLike) -> str:
    """One console line for a report: its metrics, the prompt count and where the report is."""
    values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items())
    return f"[lmflow-ray] eval of {result['model']} on {result['prompts']} prompts: {values} (report: {path})"
