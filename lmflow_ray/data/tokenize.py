"""Tokenization: normalised rows (formats.py) become training examples `{"input_ids", "labels"}`.

`labels` equal `input_ids` where the token is learned and -100 (ignored by the loss)
everywhere else. Conversations are rendered into learned/unlearned segments by a
template (templates.py); each segment is encoded on its own with
`add_special_tokens=False`, so a special-token string such as `<|im_end|>` becomes its
single id and no segment borrows a token across a learned/unlearned boundary.
Sequences longer than `max_length` lose their right end. `tokenize_batch` is the Ray Data
`map_batches(batch_format="numpy")` entry point.
"""

from __future__ import annotations

import functools
from typing import Any

from lmflow_ray.data.templates import render_segments
from lmflow_ray.errors import UserError

IGNORE_INDEX = -100
TOKENIZABLE_TYPES = ("text_only", "text2text", "conversation", "multiple_choice")
# A multiple_choice instance trains as text2text: the input, then this delimiter and the right choice
# (what eval's multiple-choice scoring, and lm-evaluation-harness, score as the continuation).
CHOICE_DELIMITER = " "

Example = dict[str, list[int]]


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _example(parts: list[tuple[list[int], bool]], max_length: int | None) -> Example:
    """Concatenate `(ids, learned)` parts into input_ids/labels, cut to max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, learned in parts:
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _special(token_id: int | None) -> list[int]:
    return [] if token_id is None else [token_id]


def tokenize_conversation(row: dict, tokenizer, template: str | None, max_length: int | None) -> Example:
    """A normalised conversation; only assistant turns (and their end-of-turn token) are learned."""
    segments = render_segments(row, template, tokenizer)
    encoded = _encode([text for text, _ in segments], tokenizer)
    return _example([(ids, learned) for ids, (_, learned) in zip(encoded, segments)], max_length)


def tokenize_text2text(row: dict, tokenizer, max_length: int | None) -> Example:
    """bos + input (not learned), then output + eos (learned)."""
    inp, out = _encode([row["input"], row["output"]], tokenizer)
    return _example(
        [(_special(tokenizer.bos_token_id) + inp, False), (out + _special(tokenizer.eos_token_id), True)],
        max_length,
    )


def tokenize_text(row: dict, tokenizer, max_length: int | None = None) -> Example:
    """bos + text + eos, all learned (pretraining); no cut when max_length is None."""
    (ids,) = _encode([row["text"]], tokenizer)
    return _example([(_special(tokenizer.bos_token_id) + ids + _special(tokenizer.eos_token_id), True)],
                    max_length)


def learned_token_count(labels) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


def _as_str(value: Any) -> str:
    # Arrow nulls arrive as None; numpy hands strings back as numpy.str_.
    return "" if value is None else str(value)


def _as_conversation(system: Any, messages: Any, tools: Any) -> dict:
    """A conversation row rebuilt from a numpy batch, where lists arrive as object arrays."""
    msgs = [] if messages is None else list(messages)
    return {
        "system": _as_str(system),
        "messages": [{"role": _as_str(m["role"]), "content": _as_str(m["content"])} for m in msgs],
        "tools": _as_str(tools),
    }


def batch_rows(batch: dict[str, Any], dtype: str, for_training: bool = True) -> list[dict]:
    """Normalised rows back from a Ray Data numpy batch (lists arrive as object arrays). A
    multiple_choice row becomes its training form (input -> delimiter + the right choice) unless
    `for_training` is False (then input, choices, answer)."""
    if dtype == "text_only":
        return [{"text": _as_str(t)} for t in batch["text"]]
    if dtype == "text2text":
        return [{"input": _as_str(i), "output": _as_str(o)} for i, o in zip(batch["input"], batch["output"])]
    if dtype == "multiple_choice":
        rows = [{"input": _as_str(i), "choices": [_as_str(x) for x in c], "answer": int(a)}
                for i, c, a in zip(batch["input"], batch["choices"], batch["answer"])]
        return [{"input": r["input"], "output": CHOICE_DELIMITER + r["choices"][r["answer"]]} for r in rows] \
            if for_training else rows
    n = len(batch["messages"])
    systems = batch.get("system", [None] * n)
    tools = batch.get("tools", [None] * n)
    return [_as_conversation(s, m, t) for s, m, t in zip(systems, batch["messages"], tools)]


def tokenize_row(row: dict, dtype: str, tokenizer, template: str | None, max_length: int | None) -> Example:
    """One normalised row (training form) as input_ids/labels, learned tokens as training learns them."""
    if dtype == "text_only":
        return tokenize_text(row, tokenizer, max_length)
    if dtype in ("text2text", "multiple_choice"):
        return tokenize_text2text(row, tokenizer, max_length)
    return tokenize_conversation(row, tokenizer, template, max_length)


def tokenize_batch(batch: dict[str, Any], dtype: str, tokenizer, template: str | None,
                   max_length: int | None) -> dict[str, list]:
    """A Ray Data batch of normalised rows as {"input_ids": [...], "labels": [...]}.

    text_only rows are never cut here: pack_blocks cuts their token stream into blocks
    later, and cutting each document first would throw text away.
    """
    if dtype not in TOKENIZABLE_TYPES:
        raise UserError(
            f"dataset type '{dtype}' cannot be tokenized for language-model training; "
            f"use one of {', '.join(TOKENIZABLE_TYPES)}"
        )
    cut = None if dtype == "text_only" else max_length
    examples = [tokenize_row(row, dtype, tokenizer, template, cut) for row in batch_rows(batch, dtype)]
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """A tokenizer per (Ray worker) process: tasks of one job reuse the process, so load it once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def expand_image_tokens(example: Example, image_token_id: int, tokens_per_image: int) -> Example:
    """Each image token of a tokenized example repeated to the positions its image's features fill
    (not learned)."""
    ids: list[int] = []
    labels: list[int] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        if token == image_token_id:
            ids += [token] * tokens_per_image
            labels += [IGNORE_INDEX] * tokens_per_image
        else:
            ids.append(token)
            labels.append(label)
    return {"input_ids": ids, "labels": labels}


def tokenize_image_text_batch(batch: dict[str, Any], tokenizer, template: str | None, max_length: int,
                              image_token_id: int, tokens_per_image: int) -> dict[str, list]:
    """A Ray Data batch of normalised image_text rows as input_ids / labels (each image's placeholder
    expanded to its feature positions, user turns and images not learned) with the rows' image paths.

    A row cut by `max_length` inside its image positions, or with no learned token left (e.g. its images
    in a last user turn, which has no answer to learn), comes out empty: the caller counts and drops it."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "image": []}
    for row, images in zip(batch_rows(batch, "conversation"), batch["image"]):
        images = [str(x) for x in images]
        example = expand_image_tokens(tokenize_conversation(row, tokenizer, template, None), image_token_id,
                                      tokens_per_image)
        ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
        if ids.count(image_token_id) != len(images) * tokens_per_image or learned_token_count(labels) == 0:
            ids, labels = [], []
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["image"].append(images)
    return out
