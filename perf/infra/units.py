"""Command-line lists, sizes and bandwidth factors every benchmark and the analysis share.

Standard library only: the raw-MPI sweep (perf/bench/pingpong.py) imports this without
torch, so that it stays cheap to start on every rank.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

# Collectives the analysis knows, most specific first ("reduce_scatter" before "reduce").
_BASE_OPS = ("reduce_scatter", "allreduce", "allgather", "alltoall", "broadcast", "reduce",
             "pingpong", "sendrecv")


def comma_list(text: str, convert: Callable[[str], T] = str) -> list[T]:
    """'a, b,,c' -> [convert('a'), convert('b'), convert('c')]: empty items are skipped."""
    return [convert(s.strip()) for s in text.split(",") if s.strip()]


def parse_size(text: str) -> int:
    """A size with an optional binary suffix, case-insensitive: '4k' -> 4096,
    '1M' -> 1048576, '0.5k' -> 512, '123' -> 123."""
    text = text.strip().lower()
    mult = _SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in _SUFFIX else text) * mult)


def parse_sizes(text: str) -> list[int]:
    """A comma list of sizes ('1k,64k,1m'); empty items are skipped."""
    return comma_list(text, parse_size)


def base_op(op: str) -> str:
    """The collective an op name contains ('allreduce-sparse' -> 'allreduce',
    'Reduce-Scatter' -> 'reduce_scatter'); a name without one comes back normalised
    (lower case, '_' for '-')."""
    op = op.lower().replace("-", "_")
    for name in _BASE_OPS:
        if name in op:
            return name
    return op


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' bus-bandwidth factor (docs/design.md §6): busbw = algbw × factor, and a
    bandwidth-optimal algorithm puts factor × the array's bytes on the wire per rank.
    allreduce 2(P−1)/P; reduce_scatter, allgather, alltoall (P−1)/P; broadcast, reduce,
    point-to-point and ops it does not know 1."""
    base, p = base_op(op), world_size
    if p <= 0:
        return 1.0
    if base == "allreduce":
        return 2 * (p - 1) / p
    if base in ("reduce_scatter", "allgather", "alltoall"):
        return (p - 1) / p
    return 1.0
