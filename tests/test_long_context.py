"""Long context by RoPE scaling: a model trained on 64-token blocks, run on 256-token text.

The model (tiny-llama's shape with max_position_embeddings = 64) is pretrained here on
64-token blocks of the bundled corpus; perplexity is measured on held-out text at the
positions past 64, which it never saw.
- Without further training (inference option `rope_scaling`), dynamic NTK and YaRN give
  a lower perplexity there than plain RoPE extrapolation.
- Linear position interpolation needs a short finetune at the new length (as in Chen et
  al., 2023): after the same 30 deterministic steps at 256 tokens, it ends with a lower
  perplexity than plain RoPE. `lmflow-ray finetune` with `rope_scaling` trains and saves a
  model that keeps the scaling and improves on the untuned scaled model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmflow_ray.config import FinetuneConfig
from lmflow_ray.config_loading import load_config
from lmflow_ray.inference import make_engine

TRAINED, LONG = 64, 256
CORPUS = Path(__file__).resolve().parents[1] / "lmflow_ray" / "models" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """(model dir trained on 64-token blocks, train token ids, held-out token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.models.zoo import build_tiny_llama

    out = tmp_path_factory.mktemp("short") / "model"
    build_tiny_llama(out, max_position_embeddings=TRAINED)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor(tok(CORPUS.read_text(), add_special_tokens=False)["input_ids"])
    split = int(len(ids) * 0.85)
    train, held = ids[:split], ids[split:]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            starts = torch.randint(0, len(train) - TRAINED - 1, (16,), generator=g)
            x = torch.stack([train[s:s + TRAINED] for s in starts])
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    return out, train, held


def ppl_beyond_trained(model, held: torch.Tensor) -> float:
    """Perplexity over the positions >= TRAINED of consecutive LONG-token windows."""
    losses = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(held) - LONG, LONG):
            x = held[s:s + LONG][None]
            nll = torch.nn.functional.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
            losses.append(nll[TRAINED:])
    return math.exp(torch.cat(losses).mean().item())


def test_inference_scaling_lowers_perplexity_beyond_trained_context(short_model):
    path, _, held = short_model
    ppl = {kind: ppl_beyond_trained(make_engine("hf", path, **({"rope_scaling": {"rope_type": kind, "factor": 4.0}}
                                                               if kind != "none" else {})).model, held)
           for kind in ("none", "dynamic", "yarn", "linear")}
    assert all(math.isfinite(v) for v in ppl.values()), ppl
    assert ppl["dynamic"] < ppl["none"] and ppl["yarn"] < ppl["none"], ppl


def _finetune_long(path: Path, train: torch.Tensor, rope: dict | None, steps: int = 30):
    """The model after 30 AdamW steps on 256-token windows (plain torch, 1 thread, seeded: deterministic)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmflow_ray.models.loading import set_rope_scaling

    config = AutoConfig.from_pretrained(path)
    if rope:
        set_rope_scaling(config, rope)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(train) - LONG - 1, (4,), generator=g)
            x = torch.stack([train[s:s + LONG] for s in starts])
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model


def test_linear_interpolation_finetune_beats_plain_rope(short_model):
    """Position interpolation needs a short finetune at the new length; then it beats plain RoPE."""
    path, train, held = short_model
    plain = ppl_beyond_trained(_finetune_long(path, train, None), held)
    linear = ppl_beyond_trained(_finetune_long(path, train, {"rope_type": "linear", "factor": 4.0}), held)
    print(f"\nperplexity past the trained context after a 30-step finetune at 256: plain {plain:.3f}, linear {linear:.3f}")
    assert linear < 0.98 * plain, (plain, linear)


@pytest.mark.e2e
def test_finetune_config_rope_scaling_reaches_the_saved_model(ray_session, short_model, tmp_path):
    """`rope_scaling` in a finetune config: trained with it on 256-token blocks, saved with it, reloads finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.train.run import run_finetune

    path, train, held = short_model
    lines = AutoTokenizer.from_pretrained(path).decode(train).split("\n")
    # Long instances of running text (like the held-out text), packed into 256-token blocks.
    chunks = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps({"type": "text_only", "instances": [{"text": c} for c in chunks]}))
    out = tmp_path / "linear"
    base = {"model": str(path), "data": {"path": str(data), "max_length": LONG, "packing": True},
            "output_dir": str(out), "deepspeed": "zero0", "seed": 1, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "train": {"num_epochs": 1, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "save_steps": 0}}
    run_finetune(load_config(FinetuneConfig, None, [], base=base))
    saved = json.loads((out / "model" / "config.json").read_text())
    params = saved.get("rope_parameters") or saved.get("rope_scaling")
    assert params["rope_type"] == "linear" and params["factor"] == 4.0, saved
    ppl = ppl_beyond_trained(AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32), held)
    assert math.isfinite(ppl) and ppl < ppl_beyond_trained(
        make_engine("hf", path, rope_scaling={"rope_type": "linear", "factor": 4.0}).model, held)
