"""Starting (or joining) Ray quietly, the same way for every command.

Which cluster a command uses is explicit: the one in `RAY_ADDRESS` (set by `ray job
submit` inside a job, or by the user: an address, or `auto` for the cluster `ray start`
left on this machine), otherwise a private local one started for this command
(`address="local"`). A cluster started on this machine by `ray start --head` is not joined
silently (Ray's own `ray.init()` would, through its address file, even a stale one):
the command says it is there and how to use it. On a small machine the local cluster
advertises more logical CPUs than cores (`LMFLOW_RAY_NUM_CPUS`, default max(8, cores)) so
trainer workers, generation and reward actors can all be scheduled at once; they share
the real cores. The local cluster keeps Ray's dashboard (~1.5 s of start-up): Ray Train's
placement-group cleaner watches each run's controller through the state API it serves.
"""

from __future__ import annotations

import logging
import os

from lmflow_ray import console


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Read tasks merge their blocks up to this size before handing them on: 16 MiB keeps a
    # reader streaming a multi-GB file at ~150 MB instead of ~500 MB (benchmarks/data_memory.py).
    ctx.target_max_block_size = 16 * 1024 * 1024
    if not os.environ.get("RAY_ADDRESS"):
        # Locally the logical CPU count is inflated (see above); cap data tasks at the real
        # cores so a small job does not start (and import torch in) a worker per logical CPU.
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=os.cpu_count() or 2)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def running_local_cluster() -> str | None:
    """The address of a live cluster that `ray start` left on this machine (its address file), else None.

    A stale file (the head is gone) counts as none: nothing answers on its GCS port.
    """
    import socket

    from ray._common.utils import get_ray_address_file

    try:
        address = open(get_ray_address_file(None)).read().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=0.5):
            return address
    except (OSError, ValueError):
        return None


def init_ray(num_cpus: int | None = None):
    import sys

    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train's controller polls its workers this often (default 2 s): a run's start and end each wait
    # for a poll, seconds that short jobs (and an RL run's trainer restarts) feel. Ray Train passes the
    # setting on from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # A cluster started for this command on this machine cannot be preempted: Ray Train's preemption
        # watcher (an actor per run, for spot nodes) only costs start-up time and a warning line here.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        running = running_local_cluster()
        if running:
            print(f"[lmflow-ray] note: a Ray cluster started by `ray start` runs on this machine ({running}); this "
                  "command starts its own local one. To run on that cluster: RAY_ADDRESS=auto lmflow-ray ...",
                  file=sys.stderr)
        cpus = num_cpus or int(os.environ.get("LMFLOW_RAY_NUM_CPUS", max(8, os.cpu_count() or 2)))
        ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING)
    console.attach_ray()
    quiet_ray_data()
    return ray
