"""torch's own PowerSGD DDP communication hook on the `commrt` backend.

With matrix_approximation_rank equal to the smallest matrix dimension and
min_compression_rate=0, every weight matrix goes through the compressed path (two
allreduces of P and Q issued from inside future callbacks, orthogonalisation, error
feedback) yet the low-rank approximation is exact: parameters must then equal those of
one process training on the concatenated batch, to float tolerance."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from backend_util import HIDDEN, global_batch, init_commrt, make_model, reference_params
from harness import run_ranks

STEPS, PER_RANK, LR = 5, 3, 0.05


def _powersgd_worker(seed: int, bucket_cap_mb: float) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    ddp = torch.nn.parallel.DistributedDataParallel(make_model(seed), bucket_cap_mb=bucket_cap_mb)
    state = powerSGD.PowerSGDState(process_group=None, matrix_approximation_rank=HIDDEN,
                                   start_powerSGD_iter=2, min_compression_rate=0.0,
                                   use_error_feedback=True, warm_start=True, random_seed=seed)
    ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        x, y = global_batch(seed, step, P, PER_RANK)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        opt.step()
    if not state.p_memory_dict or state.iter < STEPS:
        raise AssertionError(f"PowerSGD's compressed path did not run (iter {state.iter}, "
                             f"{len(state.p_memory_dict)} P matrices)")
    expected = reference_params(seed, STEPS, P, PER_RANK, LR)
    for i, (p, q) in enumerate(zip(ddp.module.parameters(), expected)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, i=i: f"parameter {i} on rank {rank}: {m}")
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [2, 3, 4, 5])
def test_client_powersgd_hook(nprocs: int, seed: int) -> None:
    # several buckets at odd world sizes: hook chains of different buckets interleave
    run_ranks(_powersgd_worker, nprocs, timeout=240, seed=seed,
              bucket_cap_mb=0.0005 if nprocs % 2 else 25.0)
