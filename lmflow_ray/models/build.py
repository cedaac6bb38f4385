"""The model a training job starts from: a causal LM, or the same backbone with a one-score head
(reward models), in the dtype the plan says, with RoPE scaling, gradient checkpointing, QLoRA
preparation and LoRA adapters as the config asks. The finetuning loop's tasks and the RL trainer
group build their models here."""

from __future__ import annotations


def build_model(cfg, plan, head: str = "causal"):
    """The model to train: a causal LM, or (head="reward") the same backbone with a one-score head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmflow_ray.models.loading import set_rope_scaling
    from lmflow_ray.models.peft_utils import apply_lora

    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    hf_config = AutoConfig.from_pretrained(plan.model_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.rope_scaling:
        set_rope_scaling(hf_config, dict(cfg.rope_scaling))
    kwargs = {}
    if cfg.lora.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    cls = AutoModelForCausalLM
    if head == "reward":
        cls = AutoModelForSequenceClassification
        hf_config.num_labels = 1
        hf_config.pad_token_id = plan.pad_id  # the score is read at the last non-pad token
    model = cls.from_pretrained(
        plan.model_path, config=hf_config, dtype=dtype, use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code, **kwargs,
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.lora.enabled:
        lo = cfg.lora
        model = apply_lora(model, lo.r, lo.alpha, lo.dropout, lo.target_modules, cfg.train.gradient_checkpointing,
                           task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    return model


# The parts of a LLaVA model (module names in transformers' LlavaForConditionalGeneration) by the names
# `vlm.trainable` uses.
VLM_PART_MODULES = {"projector": ("model.multi_modal_projector",),
                    "language_model": ("model.language_model", "lm_head"),
                    "vision_tower": ("model.vision_tower",)}


def build_vlm(cfg, plan):
    """The vision-language model to train (a LLaVA directory), with only `vlm.trainable`'s parts learning;
    with LoRA, adapters on the language model's `lora.target_modules` and the projector trained whole."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(plan.model_path, dtype=dtype, use_safetensors=True)
    model.requires_grad_(False)
    trainable = set(cfg.vlm.trainable)
    if cfg.lora.enabled:
        trainable.discard("language_model")  # its adapters learn instead
    for part in trainable:
        for name in VLM_PART_MODULES[part]:
            model.get_submodule(name).requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lo = cfg.lora
        # only the language model's layers (a CLIP tower has q_proj / v_proj too)
        targets = r"^model\.language_model\..*\.(" + "|".join(lo.target_modules) + ")$"
        keep = [name.split(".")[-1] for part in trainable for name in VLM_PART_MODULES[part]]
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                                 target_modules=targets, modules_to_save=keep or None))
    return model
