"""Training data: LMFlow files → Ray Dataset of token rows → padded torch micro-batches.

Built once in the driver with Ray Data (`map_batches` tokenization and packing run in
Ray tasks; a small dataset is tokenized on the driver itself, see DRIVER_TOKENIZED), shuffled
with the config's seed and materialised, so every epoch and every
restart sees the same rows; Ray Train then splits it across workers
(`get_dataset_shard("train")`).

Rows: `input_ids`, `labels` (-100 = not learned) and, for packed SFT blocks,
`position_ids` restarting at 0 at each sample so packed samples do not attend to each
other (see data/packing.py).
"""

from __future__ import annotations

import math

from lmflow_ray.errors import UserError

TRAINABLE_TYPES = ("text_only", "text2text", "conversation", "multiple_choice")  # multiple_choice as text2text


def _tokenize(batch, dtype: str, tokenizer_path: str, template: str | None, max_length: int | None):
    from lmflow_ray.data.tokenize import cached_tokenizer, tokenize_batch

    return tokenize_batch(batch, dtype, cached_tokenizer(tokenizer_path), template, max_length)


def _pack(batch, block_size: int, whole_samples: bool):
    from lmflow_ray.data.packing import pack_blocks_batch, pack_sequences_batch

    return pack_sequences_batch(batch, block_size) if whole_samples else pack_blocks_batch(batch, block_size)


def split_eval(ds, eval_split: float, unit: str):
    """(train, held-out or None) of a shuffled, materialised dataset: the tail of `eval_split` rows
    (>= 1) or that fraction of them (< 1). The rows are already shuffled with the seed, so the tail is
    a random sample."""
    if not eval_split:
        return ds, None
    total = ds.count()
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(total * eval_split))
    if n_eval >= total:
        raise UserError(f"data.eval_split={eval_split} holds out {n_eval} of {total} {unit}; leave {unit} to train on")
    train, held = ds.split_at_indices([total - n_eval])
    return train.materialize(), held.materialize()


# A dataset of at most this many instances is tokenized (and packed, shuffled) on the driver, which has
# the tokenizer loaded: Ray Data's tasks would first start worker processes that import transformers
# (~8 s on a cold cluster, measured on 2 cores) for work the driver does in well under a second.
# Long documents go to the tasks whatever their count: at most DRIVER_TOKENIZED_CHARS of text here.
DRIVER_TOKENIZED = 2048
DRIVER_TOKENIZED_CHARS = 4_000_000


def small_head(ds) -> dict | None:
    """All of `ds` as one numpy batch (the format `map_batches` hands its functions) when it holds at
    most DRIVER_TOKENIZED rows and DRIVER_TOKENIZED_CHARS characters, else None (the read stops after
    the first block beyond that many rows)."""
    try:
        head = ds.take_batch(DRIVER_TOKENIZED + 1, batch_format="numpy")
    except ValueError:  # no rows at all: the Ray Data path finds none either and says so
        return None
    if len(next(iter(head.values()))) > DRIVER_TOKENIZED:
        return None
    chars = sum(len(str(x)) for column in head.values() for x in column)
    return head if chars <= DRIVER_TOKENIZED_CHARS else None


def shuffled_rows(columns: dict, seed: int):
    """A Ray Dataset of the rows of `columns` (equal-length lists), shuffled with the seed."""
    import numpy as np
    import ray.data

    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    # Blocks of ~16 MiB of token ids (the reader's block size; from_items would make one block per row).
    size = 8 * sum(len(v) for row in rows for v in row.values() if isinstance(v, (list, np.ndarray)))
    return ray.data.from_items([rows[i] for i in np.random.default_rng(seed).permutation(len(rows))],
                               override_num_blocks=max(1, min(len(rows), math.ceil(size / (16 << 20)))))


def build_token_dataset(path: str, dtype: str | None, tokenizer_path: str, template: str | None,
                        max_length: int, packing: bool | None, seed: int, eval_split: float = 0.0):
    """(train Dataset, eval Dataset or None, info dict with type, rows, eval_rows and packing); materialised."""
    from lmflow_ray.data.reader import read_dataset

    ds, dtype = read_dataset(path, dtype)
    if dtype not in TRAINABLE_TYPES:
        raise UserError(f"{path}: type '{dtype}' cannot be finetuned on; use one of {', '.join(TRAINABLE_TYPES)}")
    pack = (dtype == "text_only") if packing is None else packing
    # text_only is cut into blocks after tokenizing, so tokenize it whole.
    trunc = None if (dtype == "text_only" and pack) else max_length
    head = small_head(ds)
    if head is not None:  # the same functions as the tasks below, on the driver
        out = _tokenize(head, dtype, tokenizer_path, template, trunc)
        ds = shuffled_rows(_pack(out, max_length, dtype != "text_only") if pack else out, seed)
    else:
        ds = ds.map_batches(_tokenize, fn_args=(dtype, tokenizer_path, template, trunc), batch_format="numpy",
                            batch_size=512)
        if pack:
            ds = ds.map_batches(_pack, fn_args=(max_length, dtype != "text_only"), batch_format="numpy", batch_size=4096)
        # Materialise before shuffling: fusing the shuffle's map side with tokenization fans the
        # tokenizer out to many fresh worker processes, each paying the transformers import.
        ds = ds.materialize().random_shuffle(seed=seed)
    ds, eval_ds = split_eval(ds.materialize(), eval_split, "rows")
    rows = ds.count()
    if rows == 0:
        raise UserError(f"{path}: no training rows after tokenization (texts shorter than one block of "
                        f"{max_length} tokens?); lower data.max_length or add data")
    info = {"type": dtype, "rows": rows, "eval_rows": eval_ds.count() if eval_ds else 0, "packing": pack}
    return ds, eval_ds, info



def _tokenize_image_text(batch, tokenizer_path: str, template: str | None, max_length: int, image_token_id: int,
                         tokens_per_image: int):
    from lmflow_ray.data.tokenize import cached_tokenizer, tokenize_image_text_batch

    return tokenize_image_text_batch(batch, cached_tokenizer(tokenizer_path), template, max_length, image_token_id,
                                     tokens_per_image)


def _pixels(batch, processor_path: str):
    """Ray Data stage: each row's images decoded, resized and normalised (float32, (n, 3, H, W))."""
    from lmflow_ray.models.vision import pixel_values

    batch["pixel_values"] = [pixel_values([str(x) for x in images], processor_path) for images in batch.pop("image")]
    return batch


def with_pixels(ds, processor_path: str, batch_size: int = 32):
    """The rows' images as `pixel_values`, decoded in Ray Data tasks as the rows stream to the training
    workers (lazy: pixels are never materialised, each epoch decodes again)."""
    return ds.map_batches(_pixels, fn_args=(processor_path,), batch_format="numpy", batch_size=batch_size)


def build_image_text_dataset(path, model_path: str, template: str | None, max_length: int, seed: int,
                             eval_split: float = 0.0):
    """(train Dataset, eval Dataset or None, info) of an image_text dataset for a vision-language model
    (models/vision.py): token rows (materialised, shuffled with the seed) that name their images; the
    training run adds the lazy stage that turns them into pixels (`with_pixels`, with
    info["image_processor"]) as the rows stream to the workers."""
    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.models.vision import image_spec

    spec = image_spec(model_path)
    ds, dtype = read_dataset(path, "image_text")
    ds = ds.map_batches(_tokenize_image_text, fn_args=(model_path, template, max_length, spec["image_token_id"],
                                                       spec["tokens_per_image"]), batch_format="numpy", batch_size=256)
    ds = ds.materialize()
    total = ds.count()
    ds = ds.filter(lambda row: len(row["input_ids"]) > 0).materialize()
    dropped = total - ds.count()
    why = (f"cut by data.max_length={max_length} inside their images ({spec['tokens_per_image']} positions each) "
           "or before an answer, or their images only in a last user turn (nothing to learn after them)")
    if dropped == total:
        raise UserError(f"{path}: no training rows: all {total} were {why}; raise data.max_length or check the data")
    if dropped:
        print(f"[lmflow-ray] dropped {dropped} of {total} image_text rows: {why}", flush=True)
    ds, eval_ds = split_eval(ds.random_shuffle(seed=seed).materialize(), eval_split, "rows")
    rows = ds.count()
    info = {"type": dtype, "rows": rows, "eval_rows": eval_ds.count() if eval_ds else 0, "packing": False,
            "tokens_per_image": spec["tokens_per_image"], "image_processor": spec["processor"]}
    return ds, eval_ds, info
