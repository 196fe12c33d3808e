"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on the `commrt` backend, on CPU: sharded
parameters, all-gathered for forward/backward and gradients reduce-scattered, must after
training equal one process training on the concatenated batch."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from backend_util import global_batch, init_commrt, make_model, reference_params
from harness import run_ranks

STEPS, PER_RANK, LR = 3, 3, 0.05


def _fsdp_worker(seed: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (P,))
    model = make_model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        x, y = global_batch(seed, step, P, PER_RANK)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
    expected = reference_params(seed, STEPS, P, PER_RANK, LR)
    for i, (p, q) in enumerate(zip(model.parameters(), expected)):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, i=i: f"parameter {i} on rank {rank}: {m}")
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [2, 3, 4, 5])
def test_client_fsdp2_matches_single_process(nprocs: int, seed: int) -> None:
    run_ranks(_fsdp_worker, nprocs, timeout=240, seed=seed)
