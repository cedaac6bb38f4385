"""Training objectives as small functions with their equations.

Loss normalisation: a global batch is spread over W workers x G accumulation micro-batches.
The loss we optimise is the mean over every learned token of the global batch,

    L = (1 / N) * sum_{all learned tokens t} -log p(y_t | y_<t),   N = learned tokens in the global batch,

not the mean of per-micro-batch means (which over-weights short samples). Each micro-batch
contributes its token sum divided by the global N; see `micro_batch_loss_scale`.
"""

from __future__ import annotations


def token_nll_sum(logits, labels):
    """(sum of -log p over learned tokens, number of learned tokens); labels -100 are ignored.

    Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:].
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, (shift_labels != -100).sum()


def learned_tokens(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


def micro_batch_loss_scale(world_size: int, accumulation_steps: int, global_tokens: int) -> float:
    """Factor turning a micro-batch token sum into what DeepSpeed's backward expects.

    DeepSpeed divides each backward's loss by the accumulation steps and averages gradients
    over the data-parallel ranks; multiplying by W*G/N first leaves exactly sum/N = L.
    """
    return world_size * accumulation_steps / max(global_tokens, 1)
