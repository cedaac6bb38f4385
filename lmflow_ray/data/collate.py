"""Token rows to a right-padded tensor batch: what training, evaluation and reward scoring feed a model."""

from __future__ import annotations

import numpy as np
import torch


def collate(batch, pad_id: int):
    """Right-pad a numpy batch of token rows into tensors; attention_mask marks real tokens."""
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    width = max(len(x) for x in ids)
    n = len(ids)
    out_ids = np.full((n, width), pad_id, dtype=np.int64)
    out_labels = np.full((n, width), -100, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, (a, b) in enumerate(zip(ids, labels)):
        out_ids[i, : len(a)] = a
        out_labels[i, : len(b)] = b
        mask[i, : len(a)] = 1
    result = {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels),
              "attention_mask": torch.from_numpy(mask)}
    if "position_ids" in batch:
        pos = np.zeros((n, width), dtype=np.int64)
        for i, p in enumerate(batch["position_ids"]):
            p = np.asarray(p, dtype=np.int64)
            pos[i, : len(p)] = p
        result["position_ids"] = torch.from_numpy(pos)
    return result
