"""Token-length statistics of a dataset after templating (`lmflow-ray data stats`).

The dataset is validated, read with `read_dataset` and tokenized in Ray tasks by the same
`tokenize_batch` that training uses, so the lengths are exactly what a training run sees
(before any `max_length` cut). Each task hands back two integers per row (total and
learned tokens), never the token ids or the texts, so the driver holds 16 bytes per
instance however long the texts are. The figures help pick `data.max_length`: p99 says
how long a window keeps 99% of the rows whole.
"""

from __future__ import annotations

from pathlib import Path

from lmflow_ray.errors import UserError

PERCENTILES = (50, 90, 95, 99)


def _row_lengths(batch, dtype: str, tokenizer_path: str, template: str | None):
    """map_batches: a batch of normalised rows -> {"length", "learned"} token counts per row."""
    import numpy as np

    from lmflow_ray.data.tokenize import cached_tokenizer, learned_token_count, tokenize_batch

    # max_length=None: measure the whole row; cutting is what these figures help decide.
    examples = tokenize_batch(batch, dtype, cached_tokenizer(tokenizer_path), template, None)
    return {
        "length": np.array([len(ids) for ids in examples["input_ids"]], dtype=np.int64),
        "learned": np.array([learned_token_count(labels) for labels in examples["labels"]], dtype=np.int64),
    }


def _collect(ds):
    """The two count columns as numpy arrays (only these columns reach the driver)."""
    import numpy as np

    lengths, learned = [], []
    for batch in ds.select_columns(["length", "learned"]).iter_batches(batch_format="numpy", batch_size=None):
        lengths.append(batch["length"])
        learned.append(batch["learned"])
    return np.concatenate(lengths), np.concatenate(learned)


def check_first_row(data, dtype: str, tokenizer_path: str, template: str | None) -> None:
    """Tokenize the first instance in the driver, so a user mistake (an unknown template, a
    tokenizer without a chat template) is raised here as one clear UserError: from a Ray
    task it would come back as a UserCodeException that no longer carries the original."""
    from lmflow_ray.data.formats import normalize
    from lmflow_ray.data.source import resolve

    first = next(resolve(data, dtype).instances())
    row = normalize(dtype, first)
    _row_lengths({key: [value] for key, value in row.items()}, dtype, tokenizer_path, template)


def summarize(dtype: str, lengths, learned) -> dict:
    """The stats report from per-row token counts (total and learned)."""
    import numpy as np

    # method="higher": a reported percentile is a length some row really has, so a
    # max_length set to p99 keeps at least 99% of the rows whole.
    pct = {f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in PERCENTILES}
    return {
        "type": dtype,
        "instances": len(lengths),
        "tokens_total": int(lengths.sum()),
        "length": {"min": int(lengths.min()), **pct, "max": int(lengths.max()),
                   "mean": round(float(lengths.mean()), 2)},
        "learned_tokens_mean": round(float(learned.mean()), 2),
    }


def token_length_stats(path: str | Path, model: str, dtype: str | None = None, template: str | None = None) -> dict:
    """Token-length figures of a dataset tokenized with `model`'s tokenizer (zoo name or path)."""
    from lmflow_ray.data.reader import read_dataset
    from lmflow_ray.data.source import validate
    from lmflow_ray.data.tokenize import TOKENIZABLE_TYPES
    from lmflow_ray.models.zoo import resolve_model
    from lmflow_ray.runtime import init_ray

    summary = validate(path, dtype)
    if summary.type not in TOKENIZABLE_TYPES:
        raise UserError(
            f"{path}: 'data stats' measures token lengths of {', '.join(TOKENIZABLE_TYPES)} datasets, "
            f"not '{summary.type}'; pass a dataset of one of those types"
        )
    tokenizer_path = str(resolve_model(model))
    check_first_row(path, summary.type, tokenizer_path, template)
    init_ray()
    ds, dtype = read_dataset(path, summary.type)
    ds = ds.map_batches(_row_lengths, fn_args=(dtype, tokenizer_path, template), batch_format="numpy",
                        batch_size=512)
    lengths, learned = _collect(ds)
    return summarize(dtype, lengths, learned)
