"""The `commrt` torch.distributed backend: every c10d collective over the MPI transport.

``import commrt`` registers the backend (idempotently), after which, under ``mpirun -n N``::

    dist.init_process_group("commrt")      # no MASTER_ADDR/RANK/... needed

works with no environment set by hand: rank and world size come from MPI, and the
rendezvous store (a TCPStore, which torch requires) is created by rank 0 on a free port
that is broadcast over MPI (`commrt.transports.rendezvous`). Without an MPI launcher
(torchrun, torch.multiprocessing, or any launcher that gives rank, world size and a store)
the creator forms MPI's world through torch's store first: rank 0 starts a PMI server
(`commrt.transports.pmi`) and every rank points MPICH at it (`pmi_bootstrap`).

Layout
------
- process_group.py: `CommrtProcessGroup` subclasses ``torch.distributed.ProcessGroup``
  (c10d's ``Backend`` has no Python constructor in torch 2.11-2.14). Python callers reach
  its methods directly; C++ callers (the DDP reducer, DDP's parameter verification and
  broadcast, functional collectives) reach them through the pybind trampoline. Every
  operation takes one path (`_post`): settle pending futures, local checks, sequence
  number, agreement check, post, coalescing. It also explains the agreement modes
  (``TORCH_DISTRIBUTED_DEBUG``), and creates groups (`create_process_group`).
- ops.py: the c10d operations themselves (`CollectiveOps`, a mixin of the process
  group): each op's checks, signature and launch on the transport.
- watchdog.py: per-operation timeouts and the timeout report.
- work.py: `CommrtWork` (``wait()``, ``get_future()``) and the ordered completion of
  futures.
- validation.py: local argument checks, the reductions table, agreement error messages.

Reductions: SUM, AVG, MAX, MIN, PRODUCT, BAND, BOR, BXOR. AVG is SUM then a division
by the group size; it is defined for floating-point (and complex) tensors only: integer
and bool AVG raise ValueError (rounding would be a silent surprise). PREMUL_SUM is not
supported. float16/bfloat16 are reduced in float32 by the transport.

Wire bytes per rank (counted in ``commrt.transports.wire`` under the op's name, P ranks,
B bytes of the tensor reduced / broadcast, S bytes of the whole gathered array):
all_reduce 2(P-1)/P*B; broadcast and reduce (P-1)/P*B; all_gather(_into_tensor,
_coalesced) and reduce_scatter(_tensor) (P-1)/P*S; all_to_all(_single) the bytes addressed
to other ranks; gather: the rank's block (0 on root); scatter: (P-1) blocks on root; send:
its bytes. Not counted (control traffic): the agreement check of every collective, 128
bytes per rank (all-to-all: a row of 2P+2 int64 all-gathered).
"""
from __future__ import annotations

import threading

import torch.distributed as dist

from commrt.transports import install_env_rendezvous, launched_by_mpi, mpi_tcp_store

from .process_group import BACKEND_NAME, CommrtProcessGroup, create_process_group
from .validation import SUPPORTED_DEVICES
from .work import CommrtWork

__all__ = ["BACKEND_NAME", "SUPPORTED_DEVICES", "CommrtProcessGroup", "CommrtWork",
           "launched_by_mpi", "mpi_tcp_store", "register"]

_registered = False
_register_lock = threading.Lock()


def register() -> None:
    """Register the `commrt` backend with torch.distributed (idempotent, cheap: MPI is
    initialised only when a group is created)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        if BACKEND_NAME.upper() not in dist.Backend._plugins:
            dist.Backend.register_backend(BACKEND_NAME, create_process_group,
                                          extended_api=True, devices=list(SUPPORTED_DEVICES))
        install_env_rendezvous()
        _registered = True


if dist.is_available():
    register()
