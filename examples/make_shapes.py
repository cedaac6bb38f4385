"""Synthetic image_text data: coloured shapes on plain backgrounds, with captions and questions.

    python examples/make_shapes.py OUT_DIR [--n 360] [--heldout 60] [--seed 0]

writes OUT_DIR/images/*.png (32x32), OUT_DIR/captions.json (stage 1: image -> "a red circle"),
OUT_DIR/instructions.json (stage 2: questions about colour and shape, as conversations) and
OUT_DIR/heldout.json (images never trained on, with the colour and shape they show). The shipped
examples/data/shapes/ was made with the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": ["What colour is the shape?", "Which colour do you see?"],
             "shape": ["What shape is it?", "Which shape is in the picture?"]}


def draw(colour: str, shape: str, rng: random.Random, size: int = 32):
    from PIL import Image, ImageDraw

    grey = rng.randint(200, 255)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    r = rng.randint(8, 13) * size // 32
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make(out: Path, n: int = 360, heldout: int = 60, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n + heldout):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"images/{i:04d}.png"
        draw(colour, shape, rng).save(out / name)
        items.append({"image": name, "colour": colour, "shape": shape})
    train, held = items[:n], items[n:]
    captions = [{"image": x["image"], "input": "Describe the image.", "output": f"a {x['colour']} {x['shape']}"}
                for x in train]
    instructions = []
    for x in train:
        for kind in ("colour", "shape"):
            instructions.append({"image": x["image"], "messages": [
                {"role": "user", "content": "<image>\n" + rng.choice(QUESTIONS[kind])},
                {"role": "assistant", "content": x[kind]}]})
    files = {"captions": out / "captions.json", "instructions": out / "instructions.json",
             "heldout": out / "heldout.json"}
    files["captions"].write_text(json.dumps({"type": "image_text", "instances": captions}, indent=0))
    files["instructions"].write_text(json.dumps({"type": "image_text", "instances": instructions}, indent=0))
    files["heldout"].write_text(json.dumps({"type": "image_text", "instances": [
        {"image": x["image"], "messages": [{"role": "user", "content": "<image>\n" + QUESTIONS["colour"][0]},
                                           {"role": "assistant", "content": x["colour"]}],
         "colour": x["colour"], "shape": x["shape"]} for x in held]}, indent=0))
    return files


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps({k: str(v) for k, v in make(a.out, a.n, a.heldout, a.seed).items()}))
