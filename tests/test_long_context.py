"""Long context by RoPE scaling: a model trained on 64-token blocks, run on 256-token text.

The model (tiny-llama's shape with max_position_embeddings = 64) is pretrained here on
64-token blocks of the bundled corpus; perplexity is measured on held-out text at the
positions past 64, which it never saw.
- Without further training (inference option `rope_scaling`), dynamic NTK and YaRN give
  a lower perplexity there than plain RoPE extrapolation.
- Linear position interpolation needs a short finetune at the new length (as in Chen et
  al., 2023): `lmflow-ray finetune` with `rope_scaling` on 256-token blocks ends with a lower
  perplexity than the same finetune without it, and the saved model keeps the scaling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmflow_ray.config import FinetuneConfig, load_config
from lmflow_ray.inference.engine import make_engine

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


@pytest.mark.slow
def test_finetune_with_linear_interpolation_beats_plain_rope(ray_session, short_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmflow_ray.train.run import run_finetune

    path, train, held = short_model
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(path).decode(train)
    data = tmp_path / "long.json"
    lines = text.split("\n")
    # Long instances of running text (like the held-out text), packed into 256-token blocks.
    chunks = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    data.write_text(json.dumps({"type": "text_only", "instances": [{"text": c} for c in chunks]}))
    result = {}
    for name, rope in [("plain", None), ("linear", {"rope_type": "linear", "factor": 4.0})]:
        out = tmp_path / name
        base = {"model": str(path), "data": {"path": str(data), "max_length": LONG, "packing": True},
                "output_dir": str(out), "deepspeed": "zero0", "seed": 1,
                "scaling": {"num_workers": 1, "cpus_per_worker": 1},
                "train": {"num_epochs": 3, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "save_steps": 0}}
        if rope:
            base["rope_scaling"] = rope
        run_finetune(load_config(FinetuneConfig, None, [], base=base))
        result[name] = ppl_beyond_trained(AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32), held)
        saved = json.loads((out / "model" / "config.json").read_text())
        if rope:
            params = saved.get("rope_parameters") or saved.get("rope_scaling")
            assert params["rope_type"] == "linear" and params["factor"] == 4.0, saved
    print(f"\nperplexity beyond the trained context after finetuning: {result}")
    assert result["linear"] < result["plain"], result
