"""DistributedDataParallel on the `commrt` backend: parameters after training equal, to
float tolerance, those of one process training on the concatenated batch (several
gradient buckets, so several bucket allreduces and their futures are in flight)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from _backend_util import init_commrt
from _client_util import global_batch, make_model, reference_params
from mpi_harness import run_ranks

STEPS, PER_RANK, LR = 4, 3, 0.05


def _ddp_worker(seed: int) -> None:
    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + rank)  # different init per rank: DDP must broadcast rank 0's
    model = make_model(seed) if rank == 0 else make_model(seed + 1 + rank)
    # a tiny bucket cap puts every parameter in its own bucket
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0005)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        x, y = global_batch(seed, step, P, PER_RANK)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        opt.step()
    expected = reference_params(seed, STEPS, P, PER_RANK, LR)
    for i, (p, q) in enumerate(zip(ddp.module.parameters(), expected)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"parameter {i} on rank {rank}: {m}")
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [2, 3, 4, 5])
def test_client_ddp_matches_single_process(nprocs: int) -> None:
    run_ranks(_ddp_worker, nprocs, timeout=240, seed=random.randrange(1 << 20))
