"""Packing: blocks keep every token in order, packed SFT samples stay whole and do not see each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmflow_ray.data.packing import (
    IGNORE_INDEX,
    PAD_ID,
    pack_blocks,
    pack_blocks_batch,
    pack_sequences,
    pack_sequences_batch,
)
from lmflow_ray.models.zoo import fetch_model


def example(start: int, n: int, learned_from: int = 0) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * learned_from + ids[learned_from:]}


def test_pack_blocks_shapes_and_content():
    examples = [example(10, 7), example(100, 5, learned_from=2), example(200, 9)]
    blocks = pack_blocks(examples, block_size=4)
    assert len(blocks) == 21 // 4
    assert all(len(b["input_ids"]) == len(b["labels"]) == 4 for b in blocks)
    stream = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    assert [t for b in blocks for t in b["input_ids"]] == stream[:20]
    assert [t for b in blocks for t in b["labels"]] == labels[:20]
    assert pack_blocks([example(0, 3)], block_size=4) == []


def test_pack_blocks_batch_takes_numpy_rows():
    batch = {"input_ids": np.array([np.arange(6), np.arange(3)], dtype=object),
             "labels": np.array([np.arange(6), np.arange(3)], dtype=object)}
    out = pack_blocks_batch(batch, block_size=3)
    assert out["input_ids"] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    assert all(type(t) is int for t in out["input_ids"][0])


def test_pack_sequences_layout():
    examples = [example(10, 5), example(20, 6), example(30, 3, learned_from=1), example(40, 2), example(50, 2)]
    blocks = pack_sequences(examples, block_size=8)
    # first fit, not next fit: the 3-token sample goes back to the first block
    assert [b["input_ids"] for b in blocks] == [
        [10, 11, 12, 13, 14, 30, 31, 32],
        [20, 21, 22, 23, 24, 25, 40, 41],
        [50, 51] + [PAD_ID] * 6,
    ]
    assert [b["position_ids"] for b in blocks] == [
        [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1], list(range(8))]
    # a sample's first token is never a target (nothing of its own precedes it); padding never is
    assert blocks[0]["labels"] == [IGNORE_INDEX, 11, 12, 13, 14, IGNORE_INDEX, 31, 32]
    assert blocks[1]["labels"] == [IGNORE_INDEX, 21, 22, 23, 24, 25, IGNORE_INDEX, 41]
    assert blocks[2]["labels"] == [IGNORE_INDEX, 51] + [IGNORE_INDEX] * 6


def test_pack_sequences_never_splits_a_sample():
    lengths = np.random.default_rng(0).integers(1, 33, size=200).tolist()
    examples = [example(1000 * (i + 1), n) for i, n in enumerate(lengths)]
    blocks = pack_sequences(examples, block_size=64)
    placed = []
    for b in blocks:
        assert len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"]) == 64
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        for s, e in zip(starts, starts[1:] + [64]):
            segment = b["input_ids"][s:e]
            i = segment[0] // 1000 - 1
            n = lengths[i]
            assert segment[:n] == examples[i]["input_ids"]
            assert segment[n:] == [PAD_ID] * (e - s - n) and (e == 64 or n == e - s)
            placed.append(i)
    assert sorted(placed) == list(range(len(examples)))
    assert len(blocks) * 64 < 1.1 * sum(lengths) + 64  # first fit leaves little padding


def test_pack_sequences_cuts_overlong_and_batch_wrapper():
    out = pack_sequences_batch({"input_ids": [list(range(1, 11)), [7, 8]], "labels": [list(range(1, 11)), [7, 8]]},
                               block_size=6)
    assert out["input_ids"] == [[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fetch_model("tiny-llama")))
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


def test_packed_block_logits_match_samples_alone(tiny_model):
    rng = np.random.default_rng(1)
    vocab = tiny_model.config.vocab_size
    samples = [rng.integers(4, vocab, n).tolist() for n in (9, 5, 12)]
    examples = [{"input_ids": s, "labels": s} for s in samples]
    (block,) = pack_sequences(examples, block_size=32)
    ids = torch.tensor([block["input_ids"]])
    pos = torch.tensor([block["position_ids"]])
    with torch.no_grad():
        packed = tiny_model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0]
        cached = tiny_model(input_ids=ids, position_ids=pos, attention_mask=None).logits[0]
        offset, leaks = 0, []
        for e in examples:
            alone = tiny_model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            n = len(e["input_ids"])
            torch.testing.assert_close(packed[offset:offset + n], alone, atol=1e-4, rtol=0)
            leaks.append((cached[offset:offset + n] - alone).abs().max().item())
            offset += n
    # The trap the packing docstring warns about: with the config's use_cache=True, forward
    # builds a KV cache, transformers skips packed-sequence detection and samples attend across.
    assert leaks[0] < 1e-4 and max(leaks[1:]) > 1e-3


@pytest.mark.parametrize("limit", ["DRIVER_TOKENIZED", "DRIVER_TOKENIZED_CHARS"])  # instances, characters
@pytest.mark.parametrize("job, data", [("sft", "examples/data/sft_tiny.json"),  # packed whole samples per block
                                       ("pairs", "examples/data/preference_tiny.json")])  # RM / DPO pairs
def test_small_data_tokenized_on_the_driver_gives_the_ray_data_rows(ray_session, repo, monkeypatch, job, data, limit):
    """A dataset under DRIVER_TOKENIZED instances and DRIVER_TOKENIZED_CHARS characters is tokenized
    (and packed) on the driver: the same rows (as a multiset) and skip counts as Ray Data's tasks make,
    shuffled the same way by the same seed on every build. Over either limit, Ray Data's tasks do it."""
    from lmflow_ray.train import data as train_data
    from lmflow_ray.train.pairs import build_pair_dataset

    on_driver, small_head = [], train_data.small_head

    def watched(ds):
        head = small_head(ds)
        on_driver.append(head is not None)
        return head

    monkeypatch.setattr(train_data, "small_head", watched)

    def rows(seed: int) -> list:
        args = (str(repo / data), None, str(fetch_model("tiny-llama")), None, 64)
        if job == "pairs":
            ds, _, info = build_pair_dataset(*args, seed)
        else:
            ds, _, info = train_data.build_token_dataset(*args, True, seed)
        return [tuple(tuple(np.asarray(r[k]).reshape(-1).tolist()) for k in sorted(r)) for r in ds.take_all()], info

    (here, info), (again, _), (other_seed, _) = rows(3), rows(3), rows(4)
    monkeypatch.setattr(train_data, limit, 10)  # 10 instances or 10 characters: the data is over it
    in_tasks, info_in_tasks = rows(3)
    assert on_driver == [True, True, True, False]
    assert len(here) > 8 and sorted(here) == sorted(in_tasks) and info == info_in_tasks
    assert here == again and here != other_seed
