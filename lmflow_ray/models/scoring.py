"""What a causal LM's logits say about given tokens: per-token log-probs and NLL sums.

Position t of a causal LM's logits predicts token t + 1, so every function here scores
`logits[:, :-1]` against `ids[:, 1:]`. Used by the training losses (train/objectives.py,
train/tasks.py), evaluation (eval/), and the RL actors' log-probs (align/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_logps(logits, ids):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for every position, shape (rows, length - 1), in float32."""
    return torch.gather(logits[:, :-1, :].float().log_softmax(-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_logps(logits, labels):
    """(log p of each next token, mask of learned tokens), both (rows, length - 1): position t scores token t + 1."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    return next_token_logps(logits, labels.clamp(min=0)) * mask, mask


def token_nll_sum(logits, labels):
    """(sum of -log p over learned tokens, number of learned tokens); labels -100 are ignored.

    Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:].
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, (shift_labels != -100).sum()
