"""The weight-sync group's pieces (align/weight_sync.py) without Ray: buckets, manifest, and a real
gloo broadcast between three processes that reproduces a mixed-dtype state dict bit for bit."""

from __future__ import annotations

import io
import multiprocessing as mp
import socket

import torch

from lmflow_ray.align.weight_sync import Collective, buckets, manifest, nbytes


def _state() -> dict:
    torch.manual_seed(0)
    return {"embed.weight": torch.randn(300, 64), "norm.weight": torch.randn(64).to(torch.bfloat16),
            "layer.0.weight": torch.randn(64, 64), "layer.1.weight": torch.randn(64, 64),
            "scale": torch.tensor(2.5, dtype=torch.float64), "step": torch.tensor([7], dtype=torch.int64)}


def test_buckets_hold_one_dtype_and_respect_the_size_limit():
    state = _state()
    parts = buckets(state, bucket_mb=0.05)  # 52 KB: the 77 KB embedding goes alone, the 16 KB matrices pair up
    assert sorted(k for b in parts for k in b) == sorted(state)
    for b in parts:
        assert len({t.dtype for t in b.values()}) == 1
        assert len(b) == 1 or sum(t.numel() * t.element_size() for t in b.values()) <= 0.05 * 2**20
    assert nbytes(parts) == sum(t.numel() * t.element_size() for t in state.values())
    plan = manifest(parts)
    assert [len(b["tensors"]) for b in plan] == [len(b) for b in parts]
    assert {b["dtype"] for b in plan} == {"bfloat16", "float32", "float64", "int64"}
    assert ("scale", []) in [t for b in plan for t in map(tuple, b["tensors"])]


def _member(rank: int, world: int, port: int, plan, out) -> None:
    group = Collective()
    if rank == 0:
        group.serve(world, host="127.0.0.1", port=port)
    group.join("127.0.0.1", port, rank, world, "gloo")
    if rank == 0:
        group.send(buckets(_state(), bucket_mb=0.05))
        out.put((rank, None))
    else:  # as bytes: tensors through a queue would be shared memory owned by this exiting process
        buf = io.BytesIO()
        torch.save({k: v.clone() for k, v in group.receive(plan).items()}, buf)
        out.put((rank, buf.getvalue()))


def test_gloo_broadcast_reproduces_the_state_dict_in_every_receiver():
    ctx = mp.get_context("spawn")
    with socket.socket() as s:  # the TCPStore's port, picked here so that every member knows it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = manifest(buckets(_state(), bucket_mb=0.05))
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, 3, port, plan, out)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = _state()
    for rank in (1, 2):
        got[rank] = torch.load(io.BytesIO(got[rank]))
        assert sorted(got[rank]) == sorted(expected)
        for name, tensor in expected.items():
            assert got[rank][name].dtype == tensor.dtype and got[rank][name].shape == tensor.shape
            assert torch.equal(got[rank][name], tensor), name
