"""Starting (or joining) Ray quietly, the same way for every command.

Inside `ray job submit` or with RAY_ADDRESS set we join that cluster; otherwise we start a
local one. On a small machine the local cluster advertises more logical CPUs than cores
(`LMFLOW_RAY_NUM_CPUS`, default max(8, cores)) so trainer workers, generation and reward
actors can all be scheduled at once; they share the real cores.
"""

from __future__ import annotations

import logging
import os


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


def init_ray(num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cpus = num_cpus or int(os.environ.get("LMFLOW_RAY_NUM_CPUS", max(8, os.cpu_count() or 2)))
        ray.init(num_cpus=cpus, logging_level=logging.WARNING)
    quiet_ray_data()
    return ray
