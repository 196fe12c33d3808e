"""commrt: a communication runtime for data-parallel training over slow networks.

Importing commrt registers the `commrt` torch.distributed backend, so
``dist.init_process_group("commrt")`` works under ``mpirun``, ``torchrun`` and
``torch.multiprocessing``.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Registers the "commrt" torch.distributed backend (cheap: MPI starts with the first group).
from commrt import backend as _backend  # noqa: F401
