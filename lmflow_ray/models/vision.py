"""Vision-language models built from parts (LLaVA-style): a vision encoder, a projector, a causal LM.

The assembled model is transformers' `LlavaForConditionalGeneration`: the vision tower (any
transformers CLIP / SigLIP vision model) encodes an image into patch features, the projector (two
linear layers with GELU between, or with no activation: one linear map) turns them into the LM's
embedding width, and they take the places of the `<image>` tokens in the text. One `<image>` in a
prompt stands for `tokens_per_image` positions (one per patch; the processor expands it).

`assemble` writes it as one HF directory — config, weights, tokenizer with the `<image>` token,
image processor and processor — that plain transformers (`AutoModelForImageTextToText`,
`AutoProcessor`) loads. `image_spec` reads what the data pipeline needs from such a directory
without loading the model; `pixel_values` turns image files into the tower's input in Ray Data tasks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lmflow_ray.errors import UserError

IMAGE_TOKEN = "<image>"
VLM_MODEL_TYPES = ("llava",)  # config.json model_type of the vision-language classes we train and serve
PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}  # projector name -> the activation between its two layers


def is_vlm(path: str | Path) -> bool:
    """A model directory whose config names a vision-language class we handle."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("model_type") in VLM_MODEL_TYPES


def is_vision_tower(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    return cfg.get("model_type") in ("clip_vision_model", "siglip_vision_model", "clip", "siglip")


def image_spec(path: str | Path) -> dict:
    """What the data pipeline needs of a VLM directory: the `<image>` token id and how many positions one
    image takes, and the image processor's directory."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    vision = cfg["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    # "default" drops a CLIP tower's CLS feature; "full" keeps every feature (a CLIP tower's CLS too)
    has_cls = not str(vision.get("model_type", "clip")).startswith("siglip")
    extra = int(has_cls and cfg.get("vision_feature_select_strategy", "default") == "full")
    return {"image_token_id": cfg["image_token_index"], "tokens_per_image": patches + extra,
            "image_size": vision["image_size"], "processor": str(path)}


# ---------------------------------------------------------------------------- assembling


def assemble(lm_path: str, vision_path: str, projector: str, out_dir: Path, seed: int = 0) -> Path:
    """LM + vision tower + a new projector (seeded) as one LLaVA directory at `out_dir`."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if projector not in PROJECTORS:
        raise UserError(f"vlm.projector: unknown projector '{projector}'; use one of {', '.join(PROJECTORS)}")
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                     replace_extra_special_tokens=False)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
    tower = AutoModel.from_pretrained(vision_path, dtype=torch.float32)
    vision_config = getattr(tower.config, "vision_config", tower.config)
    # CLIP towers put a CLS feature first ("default" drops it); SigLIP towers have none ("full" keeps all)
    has_cls = not vision_config.model_type.startswith("siglip")
    strategy = "default" if has_cls else "full"
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=lm.config.to_dict(),
                         image_token_index=image_id, projector_hidden_act=PROJECTORS[projector],
                         vision_feature_select_strategy=strategy, vision_feature_layer=-2,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)  # the new projector's initial weights
    model = LlavaForConditionalGeneration(config)
    body = {k[len("model."):]: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    model.model.language_model.load_state_dict(body)
    if not lm.config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    target = model.model.vision_tower
    source = tower if type(tower) is type(target) else tower.vision_model  # a whole CLIP / SigLIP: its vision half
    target.load_state_dict(source.state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = quiet_image_processor(vision_path)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=int(has_cls),
                               chat_template=tokenizer.chat_template)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _quiet_load(cls, path: str | Path):
    """`cls.from_pretrained(path)` without transformers' warning that torchvision is missing (it breaks
    transformers' imports here; transformers falls back to its PIL image processors)."""
    import logging

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return cls.from_pretrained(str(path))
    finally:
        logger.setLevel(level)


def quiet_image_processor(path: str | Path):
    """The directory's image processor (resize, crop, normalise)."""
    from transformers import AutoImageProcessor

    return _quiet_load(AutoImageProcessor, path)


def load_processor(path: str | Path):
    """A VLM directory's processor: images to pixels, each `<image>` in the text to its feature positions."""
    from transformers import AutoProcessor

    return _quiet_load(AutoProcessor, path)


# ---------------------------------------------------------------------------- images in Ray Data tasks


@functools.lru_cache(maxsize=4)
def _processor(path: str):
    return quiet_image_processor(path)


def open_image(path: str):
    """An image file as RGB; a file that is not an image is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image {path}: cannot be read as an image ({type(e).__name__}: {e}); "
                        "give a PNG / JPEG / WebP / GIF / BMP file") from None


def as_rgb(image):
    """A file path or a PIL image as an RGB PIL image."""
    return open_image(image) if isinstance(image, str) else image.convert("RGB")


def pixel_values(images: list, processor_path: str):
    """Images (file paths or PIL images) as the vision tower's input: float32 (n, 3, H, W), resized,
    cropped and normalised by the model's own image processor."""
    import numpy as np

    pil = [as_rgb(x) for x in images]
    out = _processor(processor_path)(images=pil, return_tensors="np")["pixel_values"]
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------- the zoo's tiny vision tower


def build_tiny_clip(out_dir: Path) -> None:
    """A randomly initialised 2-layer CLIP vision tower for 32x32 images (16 patches of 8x8), seeded,
    with its image processor: the zoo's vision encoder where no real one can be downloaded."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=64)
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)
