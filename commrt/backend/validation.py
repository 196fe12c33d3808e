"""Argument checks of the `commrt` backend: local checks (each raises ValueError naming the
problem), the reductions table, and the messages of a failed cross-rank agreement.

A signature is a tuple of ints, strings and dtypes that every rank must compute equally
for the same collective (the op's name first); `commrt.transports.agreement` compares it
across ranks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

SUPPORTED_DEVICES = ("cpu", "cuda")
STRIDED = torch.strided  # (a module attribute read on every call otherwise)

RED = dist.ReduceOp.RedOpType
REDUCTIONS = {
    RED.SUM: "sum", RED.AVG: "sum", RED.MAX: "max", RED.MIN: "min",
    RED.PRODUCT: "product", RED.BAND: "band", RED.BOR: "bor", RED.BXOR: "bxor",
}


def check_tensor(t: Any, op: str, what: str = "tensor") -> torch.Tensor:
    """`t`, if it is a dense tensor on a supported device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"commrt {op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cpu or t.is_cuda):  # (t.device.type builds a device object: slower)
        raise ValueError(f"commrt {op}: {what} is on device {t.device}; the commrt backend "
                         f"supports {' and '.join(SUPPORTED_DEVICES)} tensors")
    if t.layout != STRIDED:
        raise ValueError(f"commrt {op}: {what} has layout {t.layout}; only dense (strided) "
                         "tensors are supported")
    return t


def single(tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """The one tensor of a c10d tensor list."""
    if len(tensors) != 1:
        raise ValueError(f"commrt {op}: expected exactly one tensor per rank, got {len(tensors)}")
    return check_tensor(tensors[0], op)


def _reduction(kind: Any, dtype: torch.dtype, op: str) -> tuple[str, bool]:
    name = REDUCTIONS.get(kind)
    if name is None:
        raise ValueError(f"commrt {op}: reduction {kind} is not supported (supported: SUM, "
                         "AVG, MAX, MIN, PRODUCT, BAND, BOR, BXOR)")
    average = kind == RED.AVG
    if average and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"commrt {op}: AVG is defined for floating-point tensors only, got "
                         f"{dtype}; use SUM and divide (choose the rounding yourself)")
    if name in ("band", "bor", "bxor") and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"commrt {op}: bitwise reduction {name.upper()} needs an integer or "
                         f"bool tensor, got {dtype}")
    if name in ("max", "min") and dtype.is_complex:
        raise ValueError(f"commrt {op}: {name.upper()} is not defined for complex tensors")
    return name, average


_reductions: dict[int, dict[torch.dtype, tuple[str, bool]]] = {}


def reduction(opts: Any, dtype: torch.dtype, op: str) -> tuple[str, bool]:
    """(transport reduction name, whether to divide by the group size) for opts.reduceOp
    (opts None: SUM). Cached: training loops repeat a handful of (reduction, dtype) pairs.
    On every reduction's path, so the key is ``hash(kind)``: c10d's ReduceOp and its
    RedOpType both hash to the RedOpType's value (tests/backend check this for every
    reduction), where reading ``ReduceOp.op`` and the enum's value costs ~0.3 us more;
    nested by dtype, as building a (kind, dtype) key costs more than a second lookup.
    PREMUL_SUM (any factor) hashes like itself and is rejected, so never cached."""
    kind = RED.SUM if opts is None else opts.reduceOp
    by_dtype = _reductions.get(hash(kind))
    found = None if by_dtype is None else by_dtype.get(dtype)
    if found is None:
        found = _reduction(getattr(kind, "op", kind), dtype, op)
        _reductions.setdefault(hash(kind), {})[dtype] = found
    return found


def same_dtype(tensors: Sequence[torch.Tensor], dtype: torch.dtype, op: str) -> None:
    for t in tensors:
        if t.dtype != dtype:
            raise ValueError(f"commrt {op}: tensors of dtypes {dtype} and {t.dtype} mixed in "
                             "one call")


def same_pair_dtype(inp: torch.Tensor, out: torch.Tensor, op: str) -> None:
    if inp.dtype != out.dtype:
        raise ValueError(f"commrt {op}: input dtype {inp.dtype} and output dtype {out.dtype} "
                         "differ")


def group_rank(r: Any, size: int, op: str, what: str) -> int:
    """`r` as a rank of a group of `size` ranks."""
    r = int(r)
    if not 0 <= r < size:
        raise ValueError(f"commrt {op}: {what} rank {r} is out of range for a group of "
                         f"{size} ranks")
    return r


def row_numel(t: torch.Tensor) -> int:
    """Elements per index of dim 0 (all_to_all_single splits count rows)."""
    return math.prod(t.shape[1:]) if t.dim() else 1


def splits(sizes: Sequence[int] | None, t: torch.Tensor, size: int, op: str,
           what: str) -> list[int]:
    """Rows of `t` per rank: `sizes`, or equal parts when none are given."""
    rows = t.size(0) if t.dim() else 1
    if sizes is None or len(sizes) == 0:
        if rows % size:
            raise ValueError(f"commrt {op}: the {what} has {rows} rows, not divisible by "
                             f"the world size {size}; pass split sizes")
        return [rows // size] * size
    sizes = [int(s) for s in sizes]
    if len(sizes) != size or any(s < 0 for s in sizes):
        raise ValueError(f"commrt {op}: {what} split sizes must be {size} non-negative "
                         f"numbers, got {sizes}")
    if sum(sizes) != rows:
        raise ValueError(f"commrt {op}: {what} split sizes {sizes} add up to {sum(sizes)}, "
                         f"but the {what} has {rows} rows")
    return sizes


def agreement_error(op: str, signature: tuple | None, check: Any) -> ValueError:
    """The error every rank raises when a completed agreement `check` did not agree."""
    problem = getattr(check, "problem", None)
    if problem is not None:  # a TableCheck (all-to-all) names the offending pair itself
        return ValueError(f"commrt {op}: {problem()}")
    if check.rejected:
        return ValueError(f"commrt {op}: another rank rejected its arguments for this "
                          f"collective (see its error); this rank had {signature}")
    return ValueError(f"commrt {op}: the ranks disagree on the tensors' shapes, dtypes, "
                      f"reduction or root (or call different collectives); this rank has "
                      f"{signature}")
