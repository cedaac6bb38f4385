"""Parameter-efficient tuning: LoRA / QLoRA (peft), LISA layer sampling, LoRA merging.

LISA (Pan et al. 2024, "layerwise importance sampling", shipped by LMFlow) keeps the
embeddings and the LM head trainable and, every `interval_steps` optimizer steps,
unfreezes a fresh random subset of `active_layers` decoder layers, freezing the rest.
Every worker draws the same subset (the generator is seeded by the step), so data-parallel
ranks always hold gradients for the same parameters.
"""

from __future__ import annotations

import random
from pathlib import Path

from lmflow_ray.errors import UserError
from lmflow_ray.models.vision import is_vlm, load_processor
from lmflow_ray.models.zoo import adapter_config, resolve_model


def check_target_modules(model, target_modules: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} not found in the model; available linear layers include "
            f"{sorted(n for n in names if n.endswith('proj'))[:12]}"
        )


def empty_model(model_path: str, trust_remote_code: bool = False):
    """The model's module tree without weights (meta device): for config-time checks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    cls = AutoModelForImageTextToText if is_vlm(model_path) else AutoModelForCausalLM
    with init_empty_weights():
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], gradient_checkpointing: bool,
               task_type: str = "CAUSAL_LM"):
    """LoRA on `target_modules`; for SEQ_CLS (reward models) peft also trains and saves the new score head."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, target_modules)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


def decoder_layers(model):
    """The list of transformer blocks of a causal LM (Llama-style `model.layers` and friends)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return list(obj)
    raise UserError(f"LISA: cannot find the decoder layers of {type(base).__name__}; LISA supports Llama-like models")


def lisa_select(model, active_layers: int, step: int, seed: int) -> list[int]:
    """Freeze every decoder layer except `active_layers` drawn for this step; return their indices."""
    layers = decoder_layers(model)
    k = min(active_layers, len(layers))
    chosen = sorted(random.Random(seed * 1_000_003 + step).sample(range(len(layers)), k))
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            p.requires_grad_(i in chosen)
            if i not in chosen:
                p.grad = None
    return chosen


def check_adapter_fits(base: str, adapter: str) -> Path:
    """The adapter's directory, once its LoRA matrices are known to fit `base`'s layers (else one UserError line).

    Reads only the adapter's tensor shapes and the base's module tree (meta device), so a
    mismatch is named before any weights load: peft would otherwise fail with a
    state_dict size-mismatch traceback.
    """

    from safetensors import safe_open

    try:
        adapter_dir = resolve_model(adapter)
    except UserError:  # say what an adapter dir must hold, not what a model dir must
        adapter_dir = Path(adapter)
    config = adapter_config(adapter_dir)
    if config is None:
        raise UserError(f"adapter {adapter}: no adapter_config.json in {adapter_dir}; pass a LoRA output dir "
                        "(lmflow-ray finetune with lora.enabled writes one in OUT/model)")
    trained_on = config.get("base_model_name_or_path")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return adapter_dir
    modules = dict(empty_model(str(resolve_model(base))).named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            kind = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
            if kind is None:
                continue
            name = key.removeprefix("base_model.model.").split(f".lora_{kind}.")[0]
            shape = f.get_slice(key).get_shape()
            module = modules.get(name)
            have = getattr(module, "in_features" if kind == "A" else "out_features", None)
            need = shape[1] if kind == "A" else shape[0]
            if have != need:
                found = f"its layer {name} has {have} {'inputs' if kind == 'A' else 'outputs'}" if module is not None \
                    else f"it has no layer {name}"
                raise UserError(f"adapter {adapter} does not fit base model {base}: the adapter was trained on "
                                f"{trained_on} and expects {need} {'inputs' if kind == 'A' else 'outputs'} at {name}, "
                                f"but {found}; pass the base it was trained on")
    return adapter_dir


def merge_lora(base: str, adapter: str, out: str) -> Path:
    """Merge a LoRA adapter into its base model and save a plain HF model directory."""
    import torch
    from peft import PeftModel

    from lmflow_ray.models.loading import load_causal_lm, load_tokenizer

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out}: directory exists and is not empty; choose a new directory")
    adapter_dir = check_adapter_fits(base, adapter)
    vlm = is_vlm(resolve_model(base))
    if vlm:  # a vision-language model's LoRA: merged into its language model; the processor comes along
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(resolve_model(base)), dtype=torch.float32)
    else:
        model = load_causal_lm(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    load_tokenizer(tok_src).save_pretrained(out_dir)
    if vlm:
        load_processor(resolve_model(base)).save_pretrained(out_dir)
    return out_dir
