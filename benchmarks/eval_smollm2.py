"""Evaluation figures on SmolLM2-135M-Instruct (issue: evaluation users trust, vocabulary extension).

1. `ppl`: perplexity (`--metrics nll,ppl`: the assistant turns, masked as training) on the kv2json
   held-out set (examples/data/kv2json_heldout.json) of the base model and of the shipped LoRA SFT
   (configs/sft_smollm2_lora.yaml, its 12 steps), the adapter scored without merging.
2. `mc`: multiple-choice accuracy (acc, acc_norm) on examples/data/mc_arith_test.json (80 generated
   arithmetic questions, 4 choices) before and after a LoRA SFT on mc_arith_train.json (312 items,
   multiple_choice trains as input -> " " + the right choice), and the same number from
   lm-evaluation-harness on a local task over the test file (cross-check).
3. `vocab`: tokens per character of the generated domain corpus (examples/data/domain_corpus.txt)
   with SmolLM2's tokenizer before and after `vocab extend --new-tokens 64`.

Prints one JSON object on stdout (commands and machine included).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def lora_sft(data: Path, out: Path, steps: int) -> float:
    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.train.run import run_finetune

    t0 = time.time()
    cfg = load_config(FinetuneConfig, REPO / "configs" / "sft_smollm2_lora.yaml",
                      [f"output_dir={out}", f"data.path={data}", "train.save_steps=0", f"train.max_steps={steps}"])
    run_finetune(cfg)
    return time.time() - t0


def main() -> None:
    from lmflow_ray.eval.harness import run_harness
    from lmflow_ray.eval.run import evaluate
    from lmflow_ray.runtime import init_ray
    from lmflow_ray.train.vocab import extend_vocabulary

    init_ray()
    result: dict = {"machine": machine(), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        base = "smollm2-135m-instruct"
        # 1. perplexity before / after the shipped LoRA SFT
        sft_s = lora_sft(DATA / "kv2json_train.json", tmp / "sft", 12)
        ppl = {name: evaluate(model, str(DATA / "kv2json_heldout.json"), ["nll", "ppl"], tmp / f"ppl_{name}.json")["metrics"]
               for name, model in (("base", base), ("lora_sft", str(tmp / "sft")))}
        result["ppl"] = {"data": "examples/data/kv2json_heldout.json", "sft_seconds": round(sft_s), **ppl,
                         "command": "lmflow-ray eval --model M --data examples/data/kv2json_heldout.json --metrics nll,ppl"}
        # 2. multiple choice before / after a LoRA SFT on the multiple-choice training file
        mc_s = lora_sft(DATA / "mc_arith_train.json", tmp / "mc", 40)
        test = str(DATA / "mc_arith_test.json")
        mc = {name: evaluate(model, test, ["accuracy"], tmp / f"mc_{name}.json")["metrics"]
              for name, model in (("base", base), ("lora_sft", str(tmp / "mc")))}
        task_dir = tmp / "tasks"
        task_dir.mkdir()
        yaml = (REPO / "lmflow_ray" / "eval" / "harness_tasks" / "lmflow_mc_tiny.yaml").read_text()
        (task_dir / "arith.yaml").write_text(yaml.replace("lmflow_mc_tiny", "lmflow_mc_arith").replace("{DATA}", test))
        harness = run_harness(str(tmp / "mc"), ["lmflow_mc_arith"], tmp / "harness.json", include=str(task_dir))
        result["multiple_choice"] = {"test": "examples/data/mc_arith_test.json (80)",
                                     "train": "examples/data/mc_arith_train.json (312), LoRA, 40 steps",
                                     "sft_seconds": round(mc_s), **mc,
                                     "harness_after": {k.split("/")[1]: v for k, v in harness["metrics"].items()
                                                       if not k.endswith("_stderr")}}
        # 3. tokens per character before / after vocabulary extension
        info = extend_vocabulary(base, str(DATA / "domain_corpus.txt"), 64, tmp / "vocab")
        result["vocab"] = {"corpus": "examples/data/domain_corpus.txt", "added": info["added"],
                           "tokens_per_char_before": info["corpus_tokens_before"] / info["chars"],
                           "tokens_per_char_after": info["corpus_tokens_after"] / info["chars"],
                           "ratio": info["tokens_ratio"],
                           "command": "lmflow-ray vocab extend --model smollm2-135m-instruct "
                                      "--corpus examples/data/domain_corpus.txt --new-tokens 64 --out OUT"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
