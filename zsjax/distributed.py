"""Multi-process JAX: start-up, and moving per-process data in and out of global arrays.

One process runs per host (TPU VM worker, SLURM task, or a local process with fake CPU
devices). `initialize` joins them into one JAX program before any device is touched:

- explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`;
- detected: SLURM (`srun`, SLURM_NTASKS > 1) and multi-host TPU VMs (TPU_WORKER_HOSTNAMES),
  where `jax.distributed.initialize()` finds everything itself;
- otherwise one process, and nothing is initialised.

A peer that never starts would leave the others waiting in the coordination service; here a
watchdog ends the process with a clear message after `timeout_s` instead.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

EXIT_NO_PEERS = 3


def detected_cluster() -> str | None:
    """'slurm' or 'tpu' when this process is one of several in a job JAX can auto-detect.
    ZSJAX_CLUSTER=slurm|tpu says so outright (launch/tpu_pod.sh sets it: on Cloud TPU VMs JAX
    finds the other workers through the metadata server, not the environment)."""
    named = os.environ.get("ZSJAX_CLUSTER", "")
    if named:
        if named not in ("slurm", "tpu"):
            raise ValueError(f"ZSJAX_CLUSTER must be 'slurm' or 'tpu'; got {named!r}")
        return named
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    return None


def slurm_local_device_ids() -> list[int] | None:
    """With one SLURM task per node, all of the node's GPUs (JAX would otherwise give each
    task only GPU SLURM_LOCALID); None when SLURM does not say how many GPUs a node has."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    tasks = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    if not gpus.isdigit() or tasks != 1:
        return None
    return list(range(int(gpus)))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: float = 300.0) -> bool:
    """Joins this process to a multi-process JAX program; returns whether it did.

    Must run before JAX initialises its backends (before the first device query or array).
    """
    explicit = bool(coordinator_address) or num_processes > 1 or process_id >= 0
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        return False
    if explicit:
        if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                "multi-process runs need all three of --coordinator_address HOST:PORT, "
                f"--num_processes N and --process_id I with 0 <= I < N; got coordinator_address="
                f"{coordinator_address!r}, num_processes={num_processes}, process_id={process_id}")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator_address must be HOST:PORT; got "
                             f"{coordinator_address!r}")
        if num_processes == 1:
            return False
    # CPU devices of different processes talk through gloo (a no-op for GPU and TPU clients).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (f"{num_processes} processes at {coordinator_address} (this is process "
             f"{process_id})" if explicit else f"the {cluster} job's processes")
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            print(f"error: the JAX distributed runtime did not come up within {timeout_s:.0f} s: "
                  f"waited for {where}. Did every process start, with the same --num_processes "
                  "and --coordinator_address and distinct --process_id? (raise the limit with "
                  "--initialization_timeout)", file=sys.stderr, flush=True)
            os._exit(EXIT_NO_PEERS)

    threading.Thread(target=watchdog, daemon=True).start()
    # JAX's own deadline is longer, so that the message above is what a user sees.
    kwargs = {"initialization_timeout": int(timeout_s) + 60}
    if explicit:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    elif cluster == "slurm" and (gpus := slurm_local_device_ids()) is not None:
        kwargs["local_device_ids"] = gpus
    jax.distributed.initialize(**kwargs)
    done.set()
    return True


def is_lead() -> bool:
    return jax.process_index() == 0


def global_batch(local: np.ndarray, sharding) -> "jax.Array":
    """A global array whose rows are every process's `local` rows, in process order, placed
    on `sharding` (batch over its leading axis). One process: a plain device_put."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def gather(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows of `local` (same trailing shape), in process order."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def global_max(value: int) -> int:
    """The largest `value` over all processes."""
    if jax.process_count() == 1:
        return int(value)
    return int(gather(np.array([value], np.int64)).max())


def fetch_to_lead(tree):
    """NumPy copies of a tree of (possibly multi-process) arrays on process 0, None on the
    others. Every process must call it: each leaf in turn is replicated over its mesh, and only
    process 0 copies it to host memory."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    def fetch(x):
        whole = _local_whole(x)  # a collective when x spans processes: every process calls it
        return np.asarray(whole) if is_lead() else None

    out = jax.tree.map(fetch, tree)
    return out if is_lead() else None


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def rows_of_process(global_rows: int, sharding) -> slice:
    """The contiguous block of a [global_rows, ...] batch that `sharding` puts on this
    process's devices (what `global_batch` expects this process to supply)."""
    if jax.process_count() == 1:
        return slice(0, global_rows)
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((global_rows,)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo or any(b[0] != a[1] for a, b in
                                                     zip(spans, spans[1:])):
        raise ValueError(f"this process's devices hold rows {spans} of the batch, not one "
                         "contiguous block; order the mesh's devices by process")
    return slice(lo, hi)


def to_mesh(tree, shardings):
    """Copies a tree of arrays onto `shardings` (a matching tree of shardings, e.g. of another
    mesh). Within one process this is a device_put. A leaf spread over several processes is
    first replicated on its own mesh (one leaf at a time, to bound memory), then this process's
    copy is placed on the target, which must be this process's own devices."""
    return jax.tree.map(lambda x, target: jax.device_put(_local_whole(x), target), tree,
                        shardings)


def _local_whole(x):
    """`x` itself when this process holds all of it; else its whole value on one local device,
    replicated over x's mesh first (every process must take part)."""
    if x.is_fully_addressable:
        return x
    replicated = NamedSharding(x.sharding.mesh, PartitionSpec())
    return _replicator(replicated)(x).addressable_data(0)


@functools.lru_cache(maxsize=None)
def _replicator(replicated):
    return jax.jit(lambda a: a, out_shardings=replicated)
