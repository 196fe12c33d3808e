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
