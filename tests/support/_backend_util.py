"""Helpers shared by the `commrt` backend tests (imported by workers on every rank)."""
from __future__ import annotations

import zlib

import torch

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
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919
                                        + zlib.crc32(case.encode()) % 1_000_000)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        if small:  # products stay representable
            return (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    lo, hi = (1, 3) if small else ((0, 20) if dtype == torch.uint8 else (-20, 20))
    return torch.randint(lo, hi, shape, generator=gen).to(dtype)


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
            }.get(dtype, dict(rtol=0, atol=0))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.dtype == torch.bool or not actual.dtype.is_floating_point:
        if not torch.equal(actual.to(torch.int64), expected.to(torch.int64)):
            raise AssertionError(f"{what}: got {actual.tolist()} expected {expected.tolist()}")
        return
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance(actual.dtype),
                               msg=lambda m: f"{what}: {m}")
