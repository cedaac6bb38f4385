"""Packing: many short tokenized examples into fixed-size blocks, so no compute is spent on padding.

`pack_blocks` is for pretraining text: it joins every token stream and cuts it into
`block_size` blocks, dropping the remainder; documents run into each other as in GPT
pretraining. `pack_sequences` is for SFT: whole examples are placed first-fit into blocks
of `block_size` tokens and never split. Each block carries `position_ids` that restart at
0 where a sample starts. The tail of a block is padding: input id 0, label -100, and
position ids that continue the last sample's count, so padding reads as part of the last
sample, comes after it, and (being causal) changes none of its logits. The first token
of every sample gets label -100 because inside a block it would otherwise be "predicted"
from the previous sample's last token.

What the training loop must pass for a packed block: `position_ids` and
`attention_mask=None`, and also `use_cache=False`. transformers' masking utils
(`find_packed_sequence_indices` in masking_utils.py) call every place where position ids
do not rise by exactly 1 the start of a new sequence and forbid attention across such
starts, but only when the 2D attention mask is None and there is no KV cache; a model
whose config says `use_cache: true` builds a cache in forward, and then samples silently
attend to each other. tests/test_packing.py checks both halves of that on a Llama.

Both functions work on python lists; the `*_batch` wrappers are Ray Data `map_batches`
UDFs. A batch packs only its own examples, so larger batches waste less (pack_blocks
drops under one block per batch, pack_sequences fills blocks better).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from lmflow_ray.data.tokenize import IGNORE_INDEX

PAD_ID = 0

Example = dict[str, list[int]]


def pack_blocks(examples: list[Example], block_size: int) -> list[Example]:
    """Concatenate all examples and cut `block_size` blocks; the last partial block is dropped."""
    ids = list(chain.from_iterable(e["input_ids"] for e in examples))
    labels = list(chain.from_iterable(e["labels"] for e in examples))
    starts = range(0, len(ids) - block_size + 1, block_size)
    return [{"input_ids": ids[s:s + block_size], "labels": labels[s:s + block_size]} for s in starts]


def _first_fit(lengths: list[int], block_size: int) -> list[list[int]]:
    """Indices of examples per block: each goes into the first block with room, in order."""
    blocks: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for b, free in enumerate(room):
            if n <= free:
                blocks[b].append(i)
                room[b] -= n
                break
        else:
            blocks.append([i])
            room.append(block_size - n)
    return blocks


def _packed_block(samples: list[Example], block_size: int) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        ids += s["input_ids"]
        labels += [IGNORE_INDEX] + s["labels"][1:]
        positions += range(len(s["input_ids"]))
    pad = block_size - len(ids)
    last = positions[-1] + 1
    return {
        "input_ids": ids + [PAD_ID] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": positions + list(range(last, last + pad)),
    }


def pack_sequences(examples: list[Example], block_size: int) -> list[dict[str, list[int]]]:
    """Whole examples packed first-fit into padded blocks with per-sample position ids.

    An example longer than `block_size` keeps only its first `block_size` tokens (the same
    right-side cut tokenization makes); empty examples are skipped.
    """
    cut = [{"input_ids": list(e["input_ids"][:block_size]), "labels": list(e["labels"][:block_size])}
           for e in examples if len(e["input_ids"])]
    blocks = _first_fit([len(e["input_ids"]) for e in cut], block_size)
    return [_packed_block([cut[i] for i in block], block_size) for block in blocks]


def _examples(batch: dict[str, Any]) -> list[Example]:
    # Ray's numpy batches hold each row's tokens as a numpy array; tolist() gives python ints.
    return [
        {"input_ids": _as_list(ids), "labels": _as_list(labels)}
        for ids, labels in zip(batch["input_ids"], batch["labels"])
    ]


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _columns(rows: list[dict[str, list[int]]], keys: tuple[str, ...]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in keys}


def pack_blocks_batch(batch: dict[str, Any], block_size: int) -> dict[str, list]:
    """`pack_blocks` over a batch of {"input_ids", "labels"} columns."""
    return _columns(pack_blocks(_examples(batch), block_size), ("input_ids", "labels"))


def pack_sequences_batch(batch: dict[str, Any], block_size: int) -> dict[str, list]:
    """`pack_sequences` over a batch of {"input_ids", "labels"} columns."""
    return _columns(pack_sequences(_examples(batch), block_size), ("input_ids", "labels", "position_ids"))
