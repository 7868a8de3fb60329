"""The KD backend as several JAX processes (jax.distributed): one per host, driving all of its devices, or one per
GPU. Where the launcher says so (cbe.ranks: torchrun's, SLURM's or JAX's own variables), `setup_processes` joins
them before anything touches a device; from then on jax.devices() lists every process's devices, and FSDP and the
batches span them all.

Every process runs the whole loop: the same plan, the same jitted calls in the same order (they hold the
collectives). Arrays span every process's devices, so a process puts only its own devices' part (`global_array`,
`local_rows`) and reads a result whole (`to_host`). Process 0 alone writes the run dir (cbe.ranks.is_main_process);
orbax writes each checkpoint from all of them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cbe.ranks import Rendezvous, rendezvous


def coordinator(r: Rendezvous) -> str:
    """Where process 0's JAX coordinator listens: the launcher's address and port, but the port after it under
    torchrun, whose agent already serves its own store on MASTER_PORT."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return f"{r.address}:{r.port + 1}"
    return r.coordinator


def setup_processes() -> None:
    """Join this process to the run's others, if it has any (main.py calls this through the backend's spec, before
    the backend is built)."""
    r = rendezvous()
    if r.world_size > 1:
        # On CPUs the processes' collectives go over gloo (the default in both JAX stacks; said here, as it must be
        # set before the backend starts).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator(r),
            num_processes=r.world_size,
            process_id=r.rank,
            # Several processes on a host: each takes one GPU. One process: all of them.
            local_device_ids=[r.local_rank] if r.local_world_size > 1 else None,
            # Everything is given: JAX's own cluster detection would, under SLURM, narrow a host's one process to
            # its first GPU.
            cluster_detection_method="deactivate",
        )


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """An array that every process holds whole on the host, placed as `sharding` says: each process puts only the
    parts its own devices hold (jax.device_put would first check every process holds the same value)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def local_rows(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, np.ndarray]:
    """This process's rows of a batch that every process holds whole: the rows its devices hold when the batch is
    split over the devices by `sharding`, in order (what `kd.sharding.device_put` takes from each process). A run of
    one process keeps them all."""
    if jax.process_count() == 1:
        return batch
    n = len(next(iter(batch.values())))
    index = sharding.addressable_devices_indices_map((n,)).values()
    rows = sorted({row for (part,) in index for row in range(n)[part]})
    return {key: value[rows] for key, value in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a result, though its parts be on other processes' devices (then every process must ask:
    it is a collective)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
