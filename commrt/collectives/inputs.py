"""Helpers shared by the sparse and quantized collectives: groups, dtypes, agreement."""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

_HALF = (torch.float16, torch.bfloat16)


def resolve_group(group: Any):
    """The transport Communicator for `group` (None: the default group)."""
    from commrt import transports as T

    return T.for_group(group)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic and the wire use: float16/bfloat16 are upcast to float32, so
    accumulations across ranks do not round at half precision."""
    return torch.float32 if dtype in _HALF else dtype


def budget(density: float, size: int) -> int:
    """Number of entries kept out of `size` at `density`: ⌈density·size⌉ clamped to
    [1, size] (0 for an empty block). The tiny relative slack keeps ⌈0.07·100⌉ at 7."""
    if size <= 0:
        return 0
    return max(1, min(size, math.ceil(density * size * (1.0 - 1e-12))))


def float_code(x: float) -> int:
    """The bits of a float64 as an int64, to compare floats exactly across ranks."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


def agree(comm, error: str | None, signature: Sequence[int], what: str) -> None:
    """Collective: raise ValueError on every rank if any rank rejected its input locally
    (`error`) or the ranks' `signature`s differ; otherwise return on every rank.

    A local error is first shared with every rank (a flag in the same small allreduce), so
    that a mistake on one rank cannot leave the others waiting in the collective. This is
    the transport's one agreement mechanism (`Communicator.check_uniform`); it always runs
    here, since one small allreduce is cheap next to a compressed collective.
    """
    if comm.size == 1:
        if error:
            raise ValueError(error)
        return
    try:
        comm.check_uniform([1 if error else 0, *[int(v) for v in signature]], what)
    except ValueError as exc:
        if error:
            raise ValueError(error) from None
        raise ValueError(
            f"{what}: rejected on another rank, or the ranks disagree on the input "
            f"(every rank must pass tensors of the same size and dtype and the same "
            f"arguments; values are [rejected?, {', '.join(_SIGNATURE_NAMES)}]): {exc}") \
            from None
    if error:
        raise ValueError(error)


_SIGNATURE_NAMES = ("numel", "dtype", "algorithm/bits", "teams", "variant", "density")


def check_pair(tensor: Any, residual: Any) -> str | None:
    """Why (tensor, residual) is not a valid input pair, or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"tensor must be a torch.Tensor, got {type(tensor).__name__}"
    if not isinstance(residual, torch.Tensor):
        return f"residual must be a torch.Tensor, got {type(residual).__name__}"
    if not tensor.dtype.is_floating_point:
        return f"tensor must be floating point, got {tensor.dtype}"
    if residual.shape != tensor.shape or residual.dtype != tensor.dtype \
            or residual.device != tensor.device:
        return (f"residual must match tensor in shape, dtype and device: tensor "
                f"{tuple(tensor.shape)} {tensor.dtype} {tensor.device}, residual "
                f"{tuple(residual.shape)} {residual.dtype} {residual.device}")
    return None
