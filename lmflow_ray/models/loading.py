"""Loading tokenizers and models from a zoo name, an HF directory or a training output.

Weights always come from safetensors; `trust_remote_code` is off unless a config turns it on.
"""

from __future__ import annotations

from pathlib import Path

from lmflow_ray.models.zoo import resolve_model


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(str(model))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model: str | Path, dtype=None, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(str(model))
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def load_for_generation(model: str | Path, dtype=None):
    """(model, tokenizer) for a full model dir, a zoo name, or a LoRA adapter dir (base from its config)."""
    import torch

    path = resolve_model(str(model))
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        m = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    else:
        m = load_causal_lm(path, dtype=dtype)
    m.eval()
    return m, load_tokenizer(path)
