"""commrt.collectives: sparse, quantized and cyclic collectives over commrt.transports.

Sparse (SparDL and baselines): `sparse_allreduce`, `SparseAllreduce`, `spar_reduce_scatter`,
`spar_all_gather`; quantized: `quantized_allreduce`, `QuantizedAllreduce`; schedules as
plain data in `commrt.collectives.schedules`; the wait/compute split of a call's time in
`commrt.collectives.timing`.

Modules: `sparse` (the sparse allreduce and its baselines), `spardl` (SparDL's
Spar-Reduce-Scatter and Spar-All-Gather), `quantized`, `cyclic`, `schedules`, `timing`;
`inputs` (group resolution, working dtype, budgets, the cross-rank input check) and
`local_ops` (the local tensor operations on top of commrt.kernels) serve them.
"""
from .cyclic import CyclicRing, RingTransfer, cyclic_allreduce
from .quantized import QuantizedAllreduce, quantized_allreduce
from .schedules import (
    bruck_allgather_schedule,
    recursive_doubling_schedule,
    spardl_block_schedule,
    spardl_round_plan,
)
from .spardl import SAG_VARIANTS, spar_all_gather, spar_reduce_scatter
from .sparse import ALGORITHMS, SparseAllreduce, sparse_allreduce

__all__ = [
    "ALGORITHMS", "SAG_VARIANTS", "CyclicRing", "QuantizedAllreduce", "RingTransfer",
    "SparseAllreduce", "bruck_allgather_schedule", "cyclic_allreduce", "quantized_allreduce",
    "recursive_doubling_schedule", "spar_all_gather", "spar_reduce_scatter",
    "spardl_block_schedule", "spardl_round_plan", "sparse_allreduce",
]
