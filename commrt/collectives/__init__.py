"""commrt.collectives: sparse, quantized and cyclic collectives over commrt.transports.

Sparse (SparDL and baselines): `sparse_allreduce`, `SparseAllreduce`, `spar_reduce_scatter`,
`spar_all_gather`; quantized: `quantized_allreduce`, `QuantizedAllreduce`; schedules as
plain data in `commrt.collectives.schedules`; the wait/compute split of a call's time in
`commrt.collectives.timing`.
"""
from .cyclic import CyclicRing, RingTransfer, cyclic_allreduce  # noqa: F401
from .quantized import QuantizedAllreduce, quantized_allreduce  # noqa: F401
from .schedules import (  # noqa: F401
                        bruck_allgather_schedule,
                        recursive_doubling_schedule,
                        spardl_block_schedule,
                        spardl_round_plan,
)
from .sparse import (  # noqa: F401
                        ALGORITHMS,
                        SAG_VARIANTS,
                        SparseAllreduce,
                        spar_all_gather,
                        spar_reduce_scatter,
                        sparse_allreduce,
)
