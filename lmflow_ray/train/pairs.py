"""Preference pairs for reward modeling and DPO: LMFlow files → token pairs → micro-batches.

Types: `paired_conversation` (chosen/rejected conversations; the learned tokens are the
assistant turns, as in SFT), `paired_text_to_text` (prompt + chosen/rejected response,
optional `margin`) and, for reward modeling, `text_to_scored_textlist` (every two outputs
of an input with different scores make a pair, the higher-scored one chosen).

Pairs that teach nothing are skipped and counted, never a crash: chosen identical to
rejected, an empty response, or a response cut away entirely by `max_length`. The counts
go to the console and run.json. A micro-batch stacks the B chosen rows over the B rejected
rows (2B rows, right-padded), so one forward pass scores both sides.
"""

from __future__ import annotations

from itertools import combinations

from lmflow_ray.errors import UserError

PAIR_TYPES = ("paired_conversation", "paired_text_to_text", "text_to_scored_textlist")
SKIP_REASONS = ("identical", "empty", "truncated")


def _conversation(value) -> dict:
    from lmflow_ray.data.tokenize import _as_conversation

    return _as_conversation(value.get("system"), value.get("messages"), value.get("tools"))


def _last_answer(conv: dict) -> str:
    return next((m["content"] for m in reversed(conv["messages"]) if m["role"] == "assistant"), "")


def _text_pairs(batch: dict, dtype: str) -> list[tuple]:
    """(kind, chosen, rejected, margin, chosen text, rejected text) per pair of a numpy batch."""
    from lmflow_ray.data.tokenize import _as_str

    out = []
    if dtype == "paired_conversation":
        for c, r in zip(batch["chosen"], batch["rejected"]):
            c, r = _conversation(c), _conversation(r)
            out.append(("conv", c, r, 0.0, _last_answer(c), _last_answer(r)))
    elif dtype == "paired_text_to_text":
        for p, c, r, m in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["margin"]):
            p, c, r = _as_str(p), _as_str(c), _as_str(r)
            out.append(("t2t", {"input": p, "output": c}, {"input": p, "output": r}, float(m or 0.0), c, r))
    elif dtype == "text_to_scored_textlist":
        for inp, outputs in zip(batch["input"], batch["output"]):
            scored = [(_as_str(o["text"]), float(o["score"])) for o in (outputs if outputs is not None else [])]
            for (ta, sa), (tb, sb) in combinations(scored, 2):
                if sa == sb:
                    continue
                (c, _), (r, _) = ((ta, sa), (tb, sb)) if sa > sb else ((tb, sb), (ta, sa))
                out.append(("t2t", {"input": _as_str(inp), "output": c}, {"input": _as_str(inp), "output": r}, 0.0, c, r))
    else:
        raise UserError(f"dataset type '{dtype}' holds no preference pairs; use one of {', '.join(PAIR_TYPES)}")
    return out


def tokenize_pairs_batch(batch: dict, dtype: str, tokenizer, template: str | None, max_length: int) -> dict:
    from lmflow_ray.data.tokenize import tokenize_conversation, tokenize_text2text

    cols: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                             "rejected_labels", "margin", "skip")}
    for kind, chosen, rejected, margin, c_text, r_text in _text_pairs(batch, dtype):
        if kind == "conv":
            c = tokenize_conversation(chosen, tokenizer, template, max_length)
            r = tokenize_conversation(rejected, tokenizer, template, max_length)
        else:
            c, r = tokenize_text2text(chosen, tokenizer, max_length), tokenize_text2text(rejected, tokenizer, max_length)
        skip = ""
        if not c_text.strip() or not r_text.strip():
            skip = "empty"
        elif all(x == -100 for x in c["labels"][1:]) or all(x == -100 for x in r["labels"][1:]):
            skip = "truncated"
        elif c["input_ids"] == r["input_ids"]:
            skip = "identical"
        cols["chosen_input_ids"].append(c["input_ids"])
        cols["chosen_labels"].append(c["labels"])
        cols["rejected_input_ids"].append(r["input_ids"])
        cols["rejected_labels"].append(r["labels"])
        cols["margin"].append(margin)
        cols["skip"].append(skip)
    return cols


def _tokenize(batch, dtype: str, tokenizer_path: str, template: str | None, max_length: int):
    from lmflow_ray.data.tokenize import cached_tokenizer

    return tokenize_pairs_batch(batch, dtype, cached_tokenizer(tokenizer_path), template, max_length)


def _keep(batch: dict) -> dict:
    """The rows of `batch` (numpy columns, or the lists `tokenize_pairs_batch` returns) that are not skipped,
    without the `skip` column."""
    import numpy as np

    kept = np.flatnonzero(np.asarray(batch["skip"]) == "")
    return {k: v[kept] if isinstance(v, np.ndarray) else [v[i] for i in kept] for k, v in batch.items() if k != "skip"}


def _count_skips(skip, skipped: dict) -> None:
    """Add the reasons in the `skip` column to `skipped`."""
    import numpy as np

    skip = np.asarray(skip)
    for reason in SKIP_REASONS:
        skipped[reason] += int((skip == reason).sum())


def build_pair_dataset(path: str, dtype: str | None, tokenizer_path: str, template: str | None, max_length: int,
                       seed: int, eval_split: float = 0.0, allowed: tuple = PAIR_TYPES):
    """(train Dataset, eval Dataset or None, info) of token pairs; skipped pairs counted in info["skipped"]."""
    from lmflow_ray.data.reader import read_dataset

    ds, dtype = read_dataset(path, dtype)
    if dtype not in allowed:
        raise UserError(f"{path}: type '{dtype}' holds no preference pairs for this job; use one of {', '.join(allowed)}")
    from lmflow_ray.train.data import shuffled_rows, small_head, split_eval

    skipped = dict.fromkeys(SKIP_REASONS, 0)
    head = small_head(ds)
    if head is not None:  # a small dataset: the same tokenization on the driver (train/data.py)
        out = _tokenize(head, dtype, tokenizer_path, template, max_length)
        _count_skips(out["skip"], skipped)
        ds = shuffled_rows(_keep(out), seed)
    else:
        ds = ds.map_batches(_tokenize, fn_args=(dtype, tokenizer_path, template, max_length), batch_format="numpy",
                            batch_size=256).materialize()
        for b in ds.select_columns(["skip"]).iter_batches(batch_format="numpy", batch_size=4096):
            _count_skips(b["skip"], skipped)
        ds = ds.map_batches(_keep, batch_format="numpy", batch_size=4096).materialize().random_shuffle(seed=seed)
    ds, eval_ds = split_eval(ds.materialize(), eval_split, "pairs")
    rows = ds.count()
    if rows == 0:
        raise UserError(f"{path}: no usable pairs (skipped: {skipped}); check that chosen and rejected differ "
                        "and have non-empty responses, or raise data.max_length")
    info = {"type": dtype, "rows": rows, "eval_rows": eval_ds.count() if eval_ds else 0, "packing": False,
            "skipped": skipped}
    return ds, eval_ds, info


def collate_pairs(batch, pad_id: int) -> dict:
    """B pairs → 2B right-padded rows (chosen first, then rejected) + per-pair margin (and precomputed ref log-probs)."""
    import numpy as np
    import torch

    from lmflow_ray.data.collate import collate

    stacked = {"input_ids": list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"]),
               "labels": list(batch["chosen_labels"]) + list(batch["rejected_labels"])}
    out = collate(stacked, pad_id)
    out["margin"] = torch.from_numpy(np.asarray(batch["margin"], dtype=np.float32))
    for key in ("ref_logp", "ref_count"):
        if key in batch:
            both = np.asarray(batch[key], dtype=np.float32)  # (B, 2): chosen, rejected
            out[key] = torch.from_numpy(np.concatenate([both[:, 0], both[:, 1]]))
    return out
