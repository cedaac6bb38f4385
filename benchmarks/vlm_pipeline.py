"""Vision-language tuning: does the training loop wait on images, and what does each stage hold in memory?

Synthetic coloured shapes (examples/make_shapes.py; `--size` pixels a side, resized by the model's
image processor to the tower's 32x32) train both LLaVA stages (configs/vlm_stage1.yaml, then
vlm_stage2.yaml) on one Ray Train worker, in this process's local Ray cluster. Reported:

- preprocessing alone: images/s of the Ray Data stage that decodes, resizes and normalises the images
  (train/data.py::with_pixels), the dataset iterated without training;
- the loop's consumption in stage 2: images/s it trains on (steady state: first epoch's start-up excluded)
  and the share of its time spent waiting for the next micro-batch (`data_wait_s` in metrics.jsonl);
- peak RSS of the training worker (`max_rss_mb`) in stage 1 (projector only) and stage 2 (projector + LM).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _shapes():
    spec = importlib.util.spec_from_file_location("make_shapes", REPO / "examples" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(out: Path, n: int, size: int) -> dict:
    """make_shapes' data, its images redrawn at `size` pixels a side (what a camera or a crawl gives)."""
    import random

    shapes = _shapes()
    files = shapes.make(out, n=n, heldout=8, seed=0)
    if size != 32:
        rng = random.Random(0)
        for inst in json.loads(files["captions"].read_text())["instances"]:
            colour, shape = inst["output"].split()[1:]
            shapes.draw(colour, shape, rng, size=size).save(out / inst["image"])
    return files


def preprocessing_rate(files: dict, model_dir: str) -> dict:
    from lmflow_ray.train.data import build_image_text_dataset, with_pixels

    ds, _, info = build_image_text_dataset(str(files["instructions"]), model_dir, None, 64, 0)
    ds = with_pixels(ds, info["image_processor"])
    for _ in ds.iter_batches(batch_size=64, batch_format="numpy"):  # warm the map workers (imports)
        break
    t0 = time.perf_counter()
    images = sum(len(b["pixel_values"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
    wall = time.perf_counter() - t0
    return {"rows": info["rows"], "images": images, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="training images")
    ap.add_argument("--size", type=int, default=224, help="pixels a side of the source images")
    ap.add_argument("--epochs", type=int, default=2, help="stage 2 epochs")
    a = ap.parse_args()

    from lmflow_ray.config import FinetuneConfig
    from lmflow_ray.config_loading import load_config
    from lmflow_ray.runtime import init_ray
    from lmflow_ray.train.run import run_finetune

    init_ray()
    root = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    files = make_data(root / "data", a.n, a.size)
    s1, s2 = root / "stage1", root / "stage2"
    run_finetune(load_config(FinetuneConfig, REPO / "configs" / "vlm_stage1.yaml",
                             [f"output_dir={s1}", f"data.path={files['captions']}", "train.num_epochs=1"]))
    run_finetune(load_config(FinetuneConfig, REPO / "configs" / "vlm_stage2.yaml",
                             [f"model={s1}", f"output_dir={s2}", f"data.path={files['instructions']}",
                              f"train.num_epochs={a.epochs}"]))
    pre = preprocessing_rate(files, str(s1 / "base_model"))

    def rows(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]

    r1, r2 = rows(s1), rows(s2)
    micro = 16  # both configs' micro_batch_size, one image per row
    steady = [r for r in r2 if r["epoch"] >= 1 or r["step"] > len(r2) // (2 * a.epochs)]  # after the first half-epoch
    span = steady[-1]["elapsed_s"] - steady[0]["elapsed_s"]
    consumed = micro * (len(steady) - 1) / span
    waited = sum(r["data_wait_s"] for r in steady[1:])
    first_wait = r2[0]["data_wait_s"]
    print(json.dumps({
        "machine": machine(), "images": a.n, "source_size": a.size, "tower_input": 32,
        "preprocessing_alone": pre,
        "stage2_loop": {"steps": len(r2), "steady_steps": len(steady) - 1, "steady_s": round(span, 2),
                        "images_per_s": round(consumed, 1), "data_wait_share": round(waited / span, 3),
                        "first_batch_wait_s": round(first_wait, 2)},
        "preprocessing_over_consumption": round(pre["images_per_s"] / consumed, 2),
        "peak_rss_mb": {"stage1_projector": round(max(r["max_rss_mb"] for r in r1)),
                        "stage2_projector_lm": round(max(r["max_rss_mb"] for r in r2))},
        "loss": {"stage1": [round(r1[0]["loss"], 3), round(r1[-1]["loss"], 3)],
                 "stage2": [round(r2[0]["loss"], 3), round(r2[-1]["loss"], 3)]},
    }, indent=1))


if __name__ == "__main__":
    main()
