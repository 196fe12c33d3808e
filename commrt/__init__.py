"""commrt: a communication runtime for data-parallel training over slow networks.

Importing commrt registers the `commrt` torch.distributed backend, so
``dist.init_process_group("commrt")`` works under ``mpirun``, ``torchrun`` and
``torch.multiprocessing``.
"""
from __future__ import annotations

import os as _os

# In a source checkout used without installing, kernels/ and transports/ sit beside this
# package rather than inside it; an installed (or editable) commrt never needs this.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "transports", "__init__.py")) and \
        _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)  # type: ignore[name-defined]

__version__ = "0.1.0"

# Registers the "commrt" torch.distributed backend (cheap: MPI starts with the first group).
from commrt import backend as _backend  # noqa: E402,F401
