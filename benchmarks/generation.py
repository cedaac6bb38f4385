"""Generation speed: vLLM engine vs HF engine at batch sizes 1, 8, 32; HF speculative decoding.

Same model (SmolLM2-135M-Instruct, the zoo's fp32 copy), same chat prompts, greedy, up to
`--max-tokens` new tokens each, both engines in this process one after the other (HF first).
Batch size B: B prompts in one `generate` call (the vLLM engine schedules them itself; the
HF engine pads them into one batch); batch size 1: `--single` prompts one call at a time.
tokens/s = generated tokens (each row's own count, up to its end of sequence) / wall seconds.
Both engines' greedy texts are compared (identical rows are counted).

Speculative decoding (HF assisted generation, greedy, one prompt at a time): the target is
SmolLM2; the draft is SmolLM2 cut to its first `--draft-layers` decoder layers (no other
model shares its tokenizer here; a cut model is a cheap self-draft). Reported: speed-up
over plain greedy decoding of the same prompts, acceptance rate (accepted / drafted tokens)
and tokens per target forward, and whether the texts are identical (they must be).
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about rain.", "What is 12 times 7?", "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.", "What is the boiling point of water?", "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.", "What is the largest planet?", "Describe a cat in five words.",
    "Why is the sky blue?", "List two uses of copper.", "What does a thermometer measure?",
    "Suggest a name for a goldfish.",
]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + (" Be brief." if i >= len(QUESTIONS) else "")}]
            for i in range(n)]


def timed(engine, convs, params, batch: int) -> tuple[float, int, list[str]]:
    t0, tokens, texts = time.perf_counter(), 0, []
    for i in range(0, len(convs), batch):
        for group in engine.chat(convs[i:i + batch], params):
            tokens += len(group[0].token_ids)
            texts.append(group[0].text)
    return time.perf_counter() - t0, tokens, texts


def make_draft(model_dir: Path, layers: int, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.model.layers = m.model.layers[:layers]
    m.config.num_hidden_layers = layers
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:layers]
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--single", type=int, default=4, help="prompts decoded one at a time for batch size 1")
    p.add_argument("--draft-layers", type=int, default=6)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from lmflow_ray.inference import SamplingParams, make_engine
    from lmflow_ray.models.zoo import fetch_model

    model = fetch_model("smollm2-135m-instruct")
    params = SamplingParams(max_tokens=args.max_tokens)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    result = {"machine": {**machine(), "threads": args.threads, "device": "cuda" if torch.cuda.is_available() else "cpu"},
              "model": "smollm2-135m-instruct", "max_tokens": args.max_tokens, "generation": {}}
    engines = {"hf": lambda bs: make_engine("hf", model, max_batch_size=max(bs, 1))}
    if not args.skip_vllm:
        engines["vllm"] = lambda bs: make_engine("vllm", model, max_model_len=1024)
    texts: dict[str, dict[int, list[str]]] = {}
    for name, build in engines.items():
        eng = build(max(sizes))
        timed(eng, prompts(2), params, 2)  # warm-up
        texts[name] = {}
        for bs in sizes:
            n = args.single if bs == 1 else bs
            if isinstance(getattr(eng, "max_batch_size", None), int):
                eng.max_batch_size = bs
            secs, tokens, out = timed(eng, prompts(n), params, bs)
            texts[name][bs] = out
            result["generation"].setdefault(str(bs), {})[name] = {"prompts": n, "tokens": tokens, "seconds": round(secs, 2),
                                                                  "tokens_per_s": round(tokens / secs, 1)}
            print(f"{name} bs={bs}: {tokens / secs:.1f} tokens/s", file=sys.stderr, flush=True)
        del eng
    if "vllm" in texts:
        for bs in sizes:
            g = result["generation"][str(bs)]
            g["vllm_over_hf"] = round(g["vllm"]["tokens_per_s"] / g["hf"]["tokens_per_s"], 2)
            g["identical_texts"] = sum(a == b for a, b in zip(texts["hf"][bs], texts["vllm"][bs]))

    # Speculative decoding: same prompts one at a time, plain vs with the cut-down draft.
    with tempfile.TemporaryDirectory() as tmp:
        draft = make_draft(model, args.draft_layers, Path(tmp) / "draft")
        plain = make_engine("hf", model)
        spec = make_engine("hf", model, draft_model=draft, num_draft_tokens=args.draft_tokens)
        convs = prompts(args.single)
        timed(plain, prompts(1), params, 1)
        timed(spec, prompts(1), params, 1)
        s_plain, t_plain, x_plain = timed(plain, convs, params, 1)
        s_spec, t_spec, x_spec = timed(spec, convs, params, 1)
        # `last_speculation` holds one call's counts: gather them over the prompts.
        totals = {"target_forwards": 0, "draft_forwards": 0, "new_tokens": 0}
        for conv in convs:
            spec.chat([conv], params)
            for k in totals:
                totals[k] += getattr(spec.last_speculation, k)
        accepted = totals["new_tokens"] - totals["target_forwards"]
        result["speculative"] = {
            "draft": f"smollm2 first {args.draft_layers} of {len(plain.model.model.layers)} layers",
            "draft_tokens_per_round": args.draft_tokens, "prompts": len(convs),
            "plain_tokens_per_s": round(t_plain / s_plain, 1), "speculative_tokens_per_s": round(t_spec / s_spec, 1),
            "speedup": round((t_spec / s_spec) / (t_plain / s_plain), 2),
            "acceptance_rate": round(accepted / totals["draft_forwards"], 3) if totals["draft_forwards"] else 0.0,
            "tokens_per_target_forward": round(totals["new_tokens"] / totals["target_forwards"], 2),
            "identical_texts": x_plain == x_spec,
        }
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
