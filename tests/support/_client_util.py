"""Shared pieces of the client tests (DDP, FSDP2, PowerSGD on the `commrt` backend): a
small model, a global batch per step, and the single-process reference training."""
from __future__ import annotations

import torch

IN, HIDDEN, OUT = 8, 16, 4


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, OUT))


def global_batch(seed: int, step: int, world_size: int, per_rank: int):
    """The step's whole batch; rank r trains on rows r*per_rank:(r+1)*per_rank."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(world_size * per_rank, IN, generator=gen)
    y = torch.randn(world_size * per_rank, OUT, generator=gen)
    return x, y


def reference_params(seed: int, steps: int, world_size: int, per_rank: int,
                     lr: float) -> list[torch.Tensor]:
    """One process training on the concatenated batch: what data parallelism must equal."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = global_batch(seed, step, world_size, per_rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_ddp_and_check(rank: int, world_size: int, seed: int, steps: int, per_rank: int,
                        lr: float) -> None:
    """DDP on the initialised default group, each rank starting from different weights
    (DDP must broadcast rank 0's) and with a tiny bucket cap (every parameter its own
    bucket, so several bucket allreduces are in flight); the parameters must equal one
    process training on the concatenated batch."""
    import torch.distributed as dist

    assert (dist.get_rank(), dist.get_world_size()) == (rank, world_size)
    torch.manual_seed(1000 + rank)
    model = make_model(seed) if rank == 0 else make_model(seed + 1 + rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0005)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = global_batch(seed, step, world_size, per_rank)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        opt.step()
    expected = reference_params(seed, steps, world_size, per_rank, lr)
    for i, (p, q) in enumerate(zip(ddp.module.parameters(), expected)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"parameter {i} on rank {rank}: {m}")
