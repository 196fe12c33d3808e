"""Joining the job: MPI's world, the torch.distributed default group, threads per rank.

`join_world` works under mpirun/mpiexec and under torchrun (or any launcher that sets RANK,
WORLD_SIZE and MASTER_ADDR/MASTER_PORT); `init_torch_distributed` creates the default process
group over the MPI job with the commrt backend or gloo; `set_threads` divides this machine's
cores among the ranks on it.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from commrt import transports as T


def _yield_cpu_when_oversubscribed() -> None:
    """More ranks on this node than cores (or a launcher that does not say): let MPICH
    ranks that wait yield the core instead of spinning (read at MPI_Init, so before
    `T.world()`). An explicit setting wins."""
    if T.oversubscribed():
        os.environ.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")


def _started_by_torchrun() -> bool:
    """torchrun (or a launcher like it) started this process: RANK and WORLD_SIZE are
    set and no MPI launcher is present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not T.launched_by_mpi()


def _join_torchrun_world(backend: str) -> None:
    """Under torchrun the process group comes first: the commrt backend forms MPI's world
    through torch's store as it starts; with gloo, MPI's world is formed here through
    torchrun's store (MASTER_ADDR:MASTER_PORT)."""
    import torch.distributed as dist

    if backend == "commrt":
        import commrt.backend  # noqa: F401  (registers the backend)
    dist.init_process_group(backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if size > 1 and not T.mpi_started():
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              size, False)
        T.pmi_bootstrap(dist.PrefixStore("commrt.train", store), rank, size)


def join_world(backend: str) -> Any:
    """MPI's world communicator of the job (started here), whoever launched it."""
    _yield_cpu_when_oversubscribed()
    if _started_by_torchrun():
        _join_torchrun_world(backend)
    return T.world()


def init_torch_distributed(backend: str, comm) -> Any:
    """The default process group over the MPI job (created once per process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != comm.size:
            raise RuntimeError("torch.distributed is initialised with another world size")
        return dist.group.WORLD
    if backend == "commrt":
        import commrt.backend  # noqa: F401  (registers the backend)
        dist.init_process_group("commrt")
    else:
        # gloo needs a store; rank 0 serves one and MPI tells the others where it is.
        dist.init_process_group("gloo", store=T.mpi_tcp_store(comm), rank=comm.rank,
                                world_size=comm.size)
    return dist.group.WORLD


def set_threads(requested: int, comm) -> int:
    """torch threads per rank. 0: the cores this process may use divided by the ranks on
    this machine, at least 1. Ranks on one machine are counted twice over, as MPI's
    shared-memory group and as the ranks reporting the same host name, and the larger count
    wins: with MPIR_CVAR_NOLOCAL or in separate network namespaces (the perf suite's link
    emulation) MPI puts every rank in a group of its own, and giving each the whole
    machine's cores oversubscribed it many times over."""
    import torch
    threads = requested
    if threads == 0:
        local = comm.split_shared_memory()
        shared_memory_ranks = local.size
        local.free()
        hosts = comm.allgather_object(socket.gethostname())
        same_host = hosts.count(socket.gethostname())
        threads = max(1, T.usable_cores() // max(shared_memory_ranks, same_host))
    torch.set_num_threads(threads)
    return threads
