"""Pure logic of training: token loss, global-batch scaling, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from lmflow_ray.models.scoring import token_nll_sum
from lmflow_ray.train.objectives import micro_batch_loss_scale
from lmflow_ray.train.step import lr_lambda


def test_token_nll_sum_on_hand_numbers():
    # Vocabulary of 2; logits (0, ln 3) give p(token 1) = 3/4, p(token 0) = 1/4.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, math.log(3)]]])
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts label 1, position 1 predicts label 0
    total, count = token_nll_sum(logits, labels)
    assert int(count) == 2
    assert float(total) == pytest.approx(-math.log(0.75) - math.log(0.25), rel=1e-6)
    total, count = token_nll_sum(logits, torch.tensor([[-100, -100, -100]]))
    assert int(count) == 0 and float(total) == 0.0


def test_scale_makes_deepspeed_average_equal_the_global_token_mean():
    # 2 workers x 2 accumulation steps, micro-batch token sums s and counts n.
    sums, counts = [[4.0, 2.0], [9.0, 1.0]], [[2, 1], [6, 1]]
    world, gas, n_global = 2, 2, sum(map(sum, counts))
    scale = micro_batch_loss_scale(world, gas, n_global)
    # DeepSpeed: each backward divides by gas, then gradients are averaged over the world.
    deepspeed_loss = sum(sum(s * scale / gas for s in worker) for worker in sums) / world
    assert deepspeed_loss == pytest.approx(sum(map(sum, sums)) / n_global)


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup=2, total=10)
    assert [cos(0), cos(1)] == [0.5, 1.0]  # linear warmup
    assert cos(2) == pytest.approx(1.0) and cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    lin = lr_lambda("linear", warmup=0, total=10)
    assert lin(5) == pytest.approx(0.5) and lin(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(7) == 1.0


def test_one_worker_zero0_step_moves_a_parameter_without_gradient_like_deepspeeds_all_reduce(monkeypatch):
    """ZeRO-0 on one rank skips DeepSpeed's all-reduce (train/step.py::_bounded_allreduce) but keeps what it
    did besides: a trainable parameter that got no gradient this step gets zeros, so AdamW's weight decay
    still moves it, as on every rank of a multi-worker run; the used one follows its gradient."""
    import socket

    import torch.distributed as dist

    from lmflow_ray.train.step import _bounded_allreduce, deepspeed_for_training

    class TwoParts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.used(x).sum()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # what Ray Train sets
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = TwoParts()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                  "zero_optimization": {"stage": 0},
                  "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5, "torch_adam": True}}}
        engine, *_ = deepspeed_for_training().initialize(model=model, model_parameters=model.parameters(),
                                                         config=config, dist_init_required=False)
        _bounded_allreduce(engine)
        engine.backward(engine(torch.ones(1, 4)))
        engine.step()
        after = dict(model.named_parameters())
        # decoupled weight decay alone: w <- w * (1 - lr * wd)
        assert torch.allclose(after["unused.weight"], before["unused.weight"] * (1 - 0.1 * 0.5), atol=1e-6)
        assert not torch.allclose(after["used.weight"], before["used.weight"] * (1 - 0.1 * 0.5), atol=1e-3)
    finally:
        dist.destroy_process_group()
