"""The MPI library underneath the transport: mpi4py imported on first use, the MPICH
settings commrt chooses, the library's version, and whether it takes CUDA pointers.

`load_mpi()` imports `mpi4py.MPI` (which initialises MPI) on first use, so that
`import commrt` stays cheap and a launcher without MPI (torchrun, see `rendezvous`) can
prepare the environment first. Code that only runs once a communicator or request exists
reads `library.MPI` directly (the hot path: no call).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

# The mpi4py.MPI module once `load_mpi()` has run; None before.
MPI: Any = None

# MPICH settings commrt chooses unless the environment sets them. MPICH reads them when
# MPI is initialised (mpi4py does so when `mpi4py.MPI` is first imported), so they apply
# when commrt is imported before mpi4py.MPI. The non-blocking reduce-scatter's default
# algorithms ran 8-10x slower than the blocking one at some sizes (2 ranks, shm: 1 MiB
# 870-1180 us against 100-107 us); the pairwise one runs within 2-3% of it
# (results/, the backend runs).
MPICH_DEFAULTS = {"MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM": "sched_pairwise"}
for _name, _value in MPICH_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def load_mpi() -> Any:
    """The mpi4py.MPI module, imported (and MPI initialised) on the first call."""
    global MPI
    if MPI is None:
        from mpi4py import MPI as module

        MPI = module
    return MPI


def library_version() -> str:
    """The first line of the MPI library's version string (starts MPI if it is not yet)."""
    return load_mpi().Get_library_version().strip().splitlines()[0].strip()


_cuda_aware: bool | None = None


def cuda_aware() -> bool:
    """Whether MPI may be handed CUDA device pointers.

    `COMMRT_CUDA_AWARE=0|1` overrides the query. Otherwise MPICH is asked with
    `MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA)` and Open MPI with
    `MPIX_Query_cuda_support()`, both looked up with ctypes in the MPI library mpi4py is
    linked against; a library that answers neither is treated as not CUDA-aware.
    """
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("COMMRT_CUDA_AWARE")
        if env is not None:
            _cuda_aware = env.strip().lower() in ("1", "true", "yes")
        else:
            _cuda_aware = _query_cuda_aware()
    return _cuda_aware


def _query_cuda_aware() -> bool:
    MPI = load_mpi()
    try:
        lib = ctypes.CDLL(MPI.__file__)
    except OSError:
        return False
    if "MPICH" in MPI.Get_library_version() and hasattr(lib, "MPIX_GPU_query_support"):
        supported = ctypes.c_int(0)
        cuda_kind = 0  # MPIX_GPU_SUPPORT_CUDA is the first enumerator in mpi.h
        if lib.MPIX_GPU_query_support(cuda_kind, ctypes.byref(supported)) == 0:
            return bool(supported.value)
        return False
    if hasattr(lib, "MPIX_Query_cuda_support"):
        return bool(lib.MPIX_Query_cuda_support())
    return False
