"""DistributedDataParallel on the `commrt` backend: parameters after training equal, to
float tolerance, those of one process training on the concatenated batch (several
gradient buckets, so several bucket allreduces and their futures are in flight)."""
from __future__ import annotations

import pytest
import torch.distributed as dist
from backend_util import init_commrt, train_ddp_and_check
from harness import run_ranks

STEPS, PER_RANK, LR = 4, 3, 0.05


def _ddp_worker(seed: int) -> None:
    init_commrt()
    train_ddp_and_check(dist.get_rank(), dist.get_world_size(), seed, STEPS, PER_RANK, LR)
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [2, 3, 4, 5])
def test_client_ddp_matches_single_process(nprocs: int, seed: int) -> None:
    run_ranks(_ddp_worker, nprocs, timeout=240, seed=seed)
