"""Loading tokenizers and models from a zoo name, an HF directory or a training output.

Weights always come from safetensors; `trust_remote_code` is off unless a config turns it on.
"""

from __future__ import annotations

from pathlib import Path

from lmflow_ray.models.zoo import base_and_adapter, resolve_model

# Written into a reward model's output dir by `lmflow-ray reward-model`: how pairs were formatted in
# training, so that scoring (eval/reward.py) formats them the same way.
REWARD_FORMAT_FILE = "lmflow_reward.json"


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(str(model))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def set_rope_scaling(config, rope_scaling: dict):
    """Put a rope-scaling dict on an HF config (before the weights load: RoPE tables are built then).

    Merged into the config's existing rope parameters: assigning the dict alone would drop
    e.g. SmolLM2's rope_theta of 100000 and silently change every position's rotation.
    `rope_type` (or the older `type`) is one of config.ROPE_TYPES; `factor` stretches the context.
    """
    from lmflow_ray.config import check_rope_scaling
    from lmflow_ray.errors import UserError

    try:
        check_rope_scaling(rope_scaling)
    except ValueError as e:
        raise UserError(f"rope_scaling: {e}") from None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    text = config.get_text_config()
    base = dict(getattr(text, "rope_parameters", None) or {})
    if "rope_theta" not in base and getattr(text, "rope_theta", None):
        base["rope_theta"] = text.rope_theta
    merged = {**base, **{k: v for k, v in rope_scaling.items() if k != "type"}, "rope_type": kind}
    if kind == "yarn":
        merged.setdefault("original_max_position_embeddings", text.max_position_embeddings)
    text.rope_scaling = merged
    return config


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

    from lmflow_ray.models.vision import is_vlm

    base, adapter = base_and_adapter(str(model))
    path = adapter or base
    if is_vlm(base):  # a vision-language model (models/vision.py)
        from transformers import AutoModelForImageTextToText

        m = AutoModelForImageTextToText.from_pretrained(str(base), dtype=dtype or torch.float32, use_safetensors=True)
        if adapter is not None:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, str(adapter))
    elif adapter is not None:
        from peft import AutoPeftModelForCausalLM

        m = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    else:
        m = load_causal_lm(path, dtype=dtype)
    m.eval()
    return m, load_tokenizer(path)


def load_value_model(model: str | Path, dtype=None):
    """A one-label token-classification model (PPO's critic: a value per token), dropout off.

    From a critic dir, a reward model (its score head is the value head) or a causal LM (new head).
    Dropout off: training and the critic actor must compute the same values.
    """
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = resolve_model(str(model))
    config = AutoConfig.from_pretrained(str(path), num_labels=1)
    config.classifier_dropout = 0.0
    return AutoModelForTokenClassification.from_pretrained(str(path), config=config, dtype=dtype or torch.float32,
                                                           use_safetensors=True)
