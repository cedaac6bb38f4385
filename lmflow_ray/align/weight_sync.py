"""How the policy's new weights travel from trainer rank 0 to the generation actors.

`generation.weight_sync` picks the transport:

- `object_store` (default): rank 0 puts the state dict into Ray's object store in buckets of at
  most `BUCKET_MB`; each generation actor fetches them (shared memory on one node, Ray's object
  transfer between nodes). Nothing to set up, and a generation actor that Ray restarts can fetch
  the same buckets again.
- `collective`: a process group of its own between trainer rank 0 (rank 0) and the generation
  actors (ranks 1..N), opened once per run: gloo on CPU, NCCL when the trainer and the engines
  have GPUs (the path OpenRLHF and veRL take on GPU clusters: the bytes go GPU to GPU over
  NVLink / InfiniBand, never through host memory or the object store). Rank 0 broadcasts each
  bucket as one flat tensor; the others receive into buffers they allocate from a manifest
  (names, shapes, dtypes) that the driver passes along. The group is a standalone
  ProcessGroupGloo / ProcessGroupNCCL over a TCPStore served by rank 0, apart from the trainers'
  own torch.distributed world, so neither has to know the other's ranks. A broadcast needs every
  member: a generation actor that dies cannot rejoin, so the run ends and resumes from its last
  run checkpoint (`save_iterations`).
"""

from __future__ import annotations

import datetime

BUCKET_MB = 256
TIMEOUT_S = 1800  # a broadcast waits for receivers still generating (raft.overlap)


def buckets(state: dict, bucket_mb: int = BUCKET_MB) -> list[dict]:
    """The state dict in groups of one dtype and at most `bucket_mb` each (a larger tensor alone)."""
    out, current, size, dtype = [], {}, 0, None
    for name, tensor in sorted(state.items(), key=lambda kv: str(kv[1].dtype)):
        nbytes = tensor.numel() * tensor.element_size()
        if current and (size + nbytes > bucket_mb * 2**20 or tensor.dtype != dtype):
            out.append(current)
            current, size = {}, 0
        current[name], size, dtype = tensor, size + nbytes, tensor.dtype
    if current:
        out.append(current)
    return out


def manifest(parts: list[dict]) -> list[dict]:
    """What a receiver needs to allocate each bucket: its dtype and each tensor's name and shape."""
    return [{"dtype": str(next(iter(b.values())).dtype).removeprefix("torch."),
             "tensors": [(name, list(t.shape)) for name, t in b.items()]} for b in parts]


def nbytes(parts: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for b in parts for t in b.values())


class Collective:
    """One member of the weight-broadcast group (rank 0 sends, the others receive)."""

    def __init__(self):
        self.store, self.group, self.device = None, None, None

    def serve(self, world: int, host: str | None = None, port: int = 0) -> tuple[str, int]:
        """Rank 0: start the group's TCPStore (by default on a free port of this node); (host, port) for the others."""
        import torch.distributed as dist

        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, port, world, True, datetime.timedelta(seconds=TIMEOUT_S),
                                   wait_for_workers=False)
        return host, self.store.port

    def join(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        """Every member (rank 0 after `serve`): returns once all `world` members have joined."""
        import torch
        import torch.distributed as dist

        if self.store is None:
            self.store = dist.TCPStore(host, port, world, False, datetime.timedelta(seconds=TIMEOUT_S))
        store = dist.PrefixStore("lmflow-weight-sync", self.store)
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, world, options)
        else:
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(store, rank, world, timeout)
        self.backend = backend
        # One tiny broadcast so that a member that cannot reach the others fails here, not mid-run.
        self._broadcast(torch.zeros(1, device=self.device))

    def _broadcast(self, flat) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([flat], options).wait()

    def send(self, parts: list[dict]) -> None:
        import torch

        for bucket in parts:
            flat = torch.cat([t.reshape(-1) for t in bucket.values()]).to(self.device)
            self._broadcast(flat)

    def receive(self, plan: list[dict]) -> dict:
        """The state dict rank 0 sent, on this member's device (CPU for gloo, its GPU for NCCL)."""
        import math

        import torch

        state = {}
        for bucket in plan:
            sizes = [math.prod(shape) for _, shape in bucket["tensors"]]
            flat = torch.empty(sum(sizes), dtype=getattr(torch, bucket["dtype"]), device=self.device)
            self._broadcast(flat)
            for (name, shape), piece in zip(bucket["tensors"], flat.split(sizes)):
                state[name] = piece.view(shape)
        return state
