"""Weight sync from the RL trainer group into running generation engines: full weights vs a LoRA adapter,
HF vs vLLM engine, on SmolLM2-135M-Instruct.

A one-rank `TrainerGroup` (the RL trainer: DeepSpeed ZeRO-0, fp32) is built on SmolLM2, its weights
moved once by a few optimizer-free perturbations (so a sync visibly changes answers), then sent to
an HF and a vLLM `GenerationActor` as an RL iteration does, through each transport of
`generation.weight_sync`: Ray's object store, and the collective group (a gloo broadcast from
trainer rank 0; the group opened beforehand, as a run opens it once). The same again with
`lora.enabled` (only the adapter travels). Reported per case: bytes moved, seconds of the whole
sync (trainer gather, put or broadcast, actor load) and of the gather alone, and whether the
synced engine's greedy answers equal HF's answers from the same weights (LoRA: the merged model).

Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Convert to JSON: name=Umar; age=75; city=Seoul"}]]
GREEDY = {"max_tokens": 24, "temperature": 0.0}


def perturb(group, lora: bool) -> None:
    """Move the trainer's weights (LoRA: its B matrices, zero at the start) so the sync shows."""
    import ray

    def move(actor):
        import torch

        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in actor.engine.module.named_parameters():
                if (lora and "lora_B" in name) or (not lora and p.dim() == 2):
                    p.add_(torch.randn_like(p) * (0.05 if lora else 0.01) * (1 if lora else float(p.std())))

    ray.get([a.__ray_call__.remote(move) for a in group.actors])


def case(lora: bool, tmp: Path) -> dict:
    import ray

    from lmflow_ray.align.actors import GenerationActor
    from lmflow_ray.align.trainer import TrainerGroup, trainer_setup
    from lmflow_ray.config import RaftConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.inference import SamplingParams, make_engine
    from lmflow_ray.models.peft_utils import merge_lora
    from lmflow_ray.models.zoo import fetch_model

    base = str(fetch_model("smollm2-135m-instruct"))
    sets = [f"output_dir={tmp / 'unused'}"] + (["lora.enabled=true", "lora.r=8"] if lora else [])
    cfg = load_config(RaftConfig, REPO / "configs" / "raft_smollm2.yaml", sets)
    config, plan = trainer_setup(cfg, base, 10, "finetune")
    group = TrainerGroup("policy", "finetune", config, plan, 1, 1.0, False)
    perturb(group, lora)
    lora_spec = {"r": 8, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)} if lora else None
    # The reference answers: HF on the same weights (LoRA: the adapter merged into the base).
    saved = group.save(str(tmp / ("adapter" if lora else "full")))
    reference_dir = merge_lora(base, saved, str(tmp / "merged")) if lora else saved
    expected = [g[0].text for g in make_engine("hf", reference_dir).chat(PROMPTS, SamplingParams(**GREEDY))]
    out = {}
    rank0 = group.actors[0]
    for engine in ("hf", "vllm"):
        for transport in ("object_store", "collective"):
            actor = GenerationActor.options(num_cpus=1).remote(engine, base, None, 1, 8 if lora else None)
            ray.get(actor.__ray_call__.remote(lambda self: None))  # the engine has loaded
            if transport == "collective":  # the run opens its group once, before the first iteration
                host, port = ray.get(rank0.serve_sync.remote(2))
                ray.get([rank0.join_sync.remote(host, port, 2, "gloo"), actor.join_sync.remote(host, port, 1, 2, "gloo")])
            t0 = time.time()
            sent = group.weights(lora, transport)
            weights = {"id": f"bench-{transport}", "adapter": lora, "lora": lora_spec,
                       **{k: sent[k] for k in ("refs", "manifest") if k in sent}}
            calls = [actor.sync.remote(weights)] + ([rank0.send_weights.remote()] if transport == "collective" else [])
            ray.get(calls)
            seconds = time.time() - t0
            got = ray.get(actor.generate.remote(PROMPTS, 1, GREEDY, weights["id"]))
            out["bytes"] = sent["bytes"]
            out[f"{engine}_{transport}"] = {
                "sync_s": round(seconds, 3), "trainer_gather_s": round(sent["seconds"], 3),
                "greedy_equals_reference": [s["responses"][0] for s in got] == expected}
            print(json.dumps({f"{engine}_{transport}": out[f"{engine}_{transport}"]}), file=sys.stderr, flush=True)
            ray.kill(actor)
    group.close()
    return out


def main() -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from lmflow_ray.runtime import init_ray

    init_ray()
    result = {"machine": machine(), "versions": versions(), "model": "smollm2-135m-instruct"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora in (("full_weights", False), ("lora_adapter_r8", True)):
            (Path(tmp) / name).mkdir()
            result[name] = case(lora, Path(tmp) / name)
            print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
