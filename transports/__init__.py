"""commrt.transports: moving bytes between ranks.

`world()` is the MPI communicator of the whole job; `for_group(group)` turns whatever a
caller holds (nothing, a `Communicator`, or a torch.distributed process group) into an
object with the Communicator interface. `wire` counts every byte sent, by kind.
`agreement` checks that ranks called a collective with the same arguments; `rendezvous`
agrees on a torch.distributed TCPStore over MPI (`mpi_tcp_store`) and, where no MPI
launcher started the job, forms MPI's world through a store (`pmi_bootstrap`, with the
PMI server in `pmi`).

Modules: `mpi` (the Communicator), `request` (its requests and background progress),
`buffers` (tensors as MPI buffers, staging), `library` (mpi4py loaded on first use, MPICH
defaults, CUDA awareness), `wakeup` (ending a blocking wait from another thread), `job`
(the world, aborting the job on an uncaught error, `mpirun`), `counters`, `agreement`,
`rendezvous`, `pmi`, `torch_dist` (the adapter over other torch backends), `flat` (many
tensors as one flat, optionally sharded, buffer: `FlatLayout`, `flatten`, `unflatten_into`).
"""
from __future__ import annotations

import threading
from typing import Any

from .counters import WireCounter, snapshot_delta, wire
from .flat import FlatLayout, flatten, unflatten_into, unflatten_views
from .job import install_abort_on_error, mpirun_executable, world
from .library import cuda_aware, library_version
from .mpi import ANY_SOURCE, ANY_TAG, Communicator
from .rendezvous import (
    install_env_rendezvous,
    launched_by_mpi,
    mpi_started,
    mpi_tcp_store,
    pmi_bootstrap,
)
from .request import Request, wait_all
from .wakeup import Wakeup, oversubscribed, usable_cores

__all__ = [
    "ANY_SOURCE", "ANY_TAG", "Communicator", "FlatLayout", "Request", "WireCounter", "cuda_aware",
    "flatten", "for_group", "install_abort_on_error", "install_env_rendezvous", "launched_by_mpi",
    "library_version",
    "mpi_started", "mpi_tcp_store", "mpirun_executable", "oversubscribed", "pmi_bootstrap",
    "snapshot_delta", "unflatten_into", "unflatten_views", "usable_cores", "Wakeup",
    "wait_all", "wire", "world",
]

_adapters: dict[int, tuple[Any, Any]] = {}
_adapters_lock = threading.Lock()


def for_group(group: Any = None):
    """The Communicator for `group`.

    - a Communicator (or anything with the same interface) is returned as is;
    - None: the default torch.distributed group if one is initialised, else `world()`;
    - a torch ProcessGroup of the `commrt` backend: the MPI communicator underneath it
      (the backend object exposes it as `.communicator`);
    - any other torch ProcessGroup (gloo, nccl): a `TorchDistCommunicator` adapter,
      created once per group.
    """
    if group is not None and hasattr(group, "isend") and hasattr(group, "check_uniform"):
        return group
    import torch
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return world()
        group = dist.group.WORLD
    comm = getattr(group, "communicator", None)  # the commrt ProcessGroup itself
    if comm is not None:
        return comm
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
        except Exception:  # no backend registered for that device type
            continue
        comm = getattr(backend, "communicator", None)
        if comm is not None:
            return comm
    with _adapters_lock:
        entry = _adapters.get(id(group))
        if entry is None or entry[0] is not group:
            from .torch_dist import TorchDistCommunicator

            entry = (group, TorchDistCommunicator(group))
            _adapters[id(group)] = entry
        return entry[1]
