"""Helpers shared by the `commrt` backend tests (imported by workers on every rank):
dtypes, seeded per-rank inputs and tolerances; and for the client tests (DDP, FSDP2,
PowerSGD, launchers) a small model, a global batch per step, and the single-process
reference training."""
from __future__ import annotations

import torch
from harness import generator

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + [torch.bool]


def init_commrt() -> None:
    """`dist.init_process_group("commrt")` as a user would: no environment set by hand."""
    import torch.distributed as dist

    import commrt.backend  # noqa: F401  (registers the backend; `import commrt` also does)

    if not dist.is_initialized():
        dist.init_process_group("commrt")


def rank_input(seed: int, rank: int, case: str, shape, dtype: torch.dtype,
               small: bool = False) -> torch.Tensor:
    """Rank `rank`'s input for `case`: reproducible on every rank, fresh per seed."""
    gen = generator(seed, case, rank)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        if small:  # products stay representable
            return (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    lo, hi = (1, 3) if small else ((0, 20) if dtype == torch.uint8 else (-20, 20))
    return torch.randint(lo, hi, shape, generator=gen).to(dtype)


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances for a result computed in `dtype` (exact for integers)."""
    return {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
            }.get(dtype, dict(rtol=0, atol=0))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """AssertionError naming `what` unless actual equals expected within `tolerance`."""
    if actual.dtype == torch.bool or not actual.dtype.is_floating_point:
        if not torch.equal(actual.to(torch.int64), expected.to(torch.int64)):
            raise AssertionError(f"{what}: got {actual.tolist()} expected {expected.tolist()}")
        return
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance(actual.dtype),
                               msg=lambda m: f"{what}: {m}")


# -- client tests: a model trained data-parallel against one process on the whole batch

IN, HIDDEN, OUT = 8, 16, 4


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, OUT))


def global_batch(seed: int, step: int, world_size: int, per_rank: int):
    """The step's whole batch; rank r trains on rows r*per_rank:(r+1)*per_rank."""
    gen = generator(seed, "batch", step)
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
                                   msg=lambda m, i=i: f"parameter {i} on rank {rank}: {m}")
