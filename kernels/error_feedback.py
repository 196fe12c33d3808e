"""Fused error feedback: ``x = grad + residual``, top-k select, residual <- x minus selected.

``topk_error_feedback(grad, residual, k, exact=True, block_size=None) -> (values, indices)``

Three implementations (see ``dispatch``). The Triton path never materialises ``x``: every
pass of the top-k search (see ``topk``) reads ``grad`` and ``residual`` and adds them on
the fly, and the final compaction pass writes the selected ``(value, index)`` pairs and the
new residual in the same sweep. The residual is written only by that last pass, after the
NaN/Inf check of the first pass, so a ``ValueError`` leaves it untouched. The fast CPU
path selects from ``grad`` and ``residual`` read by chunks (``x`` exists a chunk at a time,
in cache), then adds ``grad`` into the residual in place and zeroes the selected entries:
two passes over memory, no full-size temporary, the residual written only after the
NaN/Inf check. The torch reference materialises ``x``.

Invariant (exact, pinned by the tests): after the call,
``residual_new + scatter(values at indices) == grad + residual_old`` element for element,
with ``x`` computed in the residual's dtype (``grad.to(residual.dtype) + residual``): the
selected entries of the residual are zero and the others hold x.
"""
from __future__ import annotations

import torch

from .dispatch import backend, check_float, check_k
from .topk import run_select
from .topk_cpu import CPU_CHUNK


def _check_pair(grad: torch.Tensor, residual: torch.Tensor) -> None:
    check_float(grad, "grad")
    check_float(residual, "residual")
    if grad.shape != residual.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != residual shape "
                         f"{tuple(residual.shape)}")
    if grad.device != residual.device:
        raise ValueError(f"grad and residual must be on the same device, got "
                         f"{grad.device} and {residual.device}")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")


def _error_feedback(grad: torch.Tensor, residual: torch.Tensor, k: int, exact: bool,
                    block_size: int | None, impl: str | None):
    _check_pair(grad, residual)
    n = residual.numel()
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        k = check_k(k, block_size, "k (per block)")
    else:
        k = check_k(k, n)
    res = residual.view(-1)
    g = grad.reshape(-1).contiguous()
    if n == 0:
        return res[:0].clone(), torch.zeros(0, dtype=torch.int64, device=res.device)
    if impl is None:
        impl = backend(g, res)
    row_len = block_size if block_size is not None else n
    values, indices, counts = run_select(g, res, row_len, k, exact, block_size is not None,
                                         impl)
    if impl == "triton":
        return values, indices   # the compaction pass already wrote the new residual
    if impl == "cpu":
        _add_into(res, g)
    else:
        # Reference: materialise x, then zero the selected entries.
        res.copy_(g.to(res.dtype) + res)
    if block_size is not None:
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=res.device), counts)
        res.index_fill_(0, rows * block_size + indices, 0)
    else:
        res.index_fill_(0, indices, 0)
    return values, indices


def _add_into(res: torch.Tensor, g: torch.Tensor) -> None:
    """res += g in place, rounding g to res's dtype first (as the reference's x)."""
    if g.dtype == res.dtype:
        res.add_(g)
        return
    buf = torch.empty(min(CPU_CHUNK, res.numel()), dtype=res.dtype)
    for start in range(0, res.numel(), CPU_CHUNK):
        end = min(start + CPU_CHUNK, res.numel())
        part = buf[:end - start]
        part.copy_(g[start:end])
        res[start:end].add_(part)


def topk_error_feedback(grad: torch.Tensor, residual: torch.Tensor, k: int,
                        exact: bool = True, block_size: int | None = None):
    """Select the top-k of ``x = grad + residual``; residual <- x with the selected zeroed.

    ``residual`` (float, contiguous, same shape and device as ``grad``; grad may have
    another float dtype) is updated in place; ``x`` is computed in the residual's dtype.
    Returns ``(values, indices)`` exactly as :func:`topk_magnitude` on x (or, with
    ``block_size``, as :func:`topk_blocks` on x: block-local indices, k per block).
    ValueError on mismatched shapes/devices, non-float dtypes, k out of range, or NaN/Inf
    in x (then the residual is left unchanged).
    """
    return _error_feedback(grad, residual, k, exact, block_size, None)


def topk_error_feedback_torch(grad: torch.Tensor, residual: torch.Tensor, k: int,
                              exact: bool = True, block_size: int | None = None):
    """The torch reference of :func:`topk_error_feedback`."""
    return _error_feedback(grad, residual, k, exact, block_size, "torch")


def topk_error_feedback_cpu(grad: torch.Tensor, residual: torch.Tensor, k: int,
                            exact: bool = True, block_size: int | None = None):
    """The fast CPU implementation of :func:`topk_error_feedback` (CPU tensors)."""
    return _error_feedback(grad, residual, k, exact, block_size, "cpu")


def topk_error_feedback_triton(grad: torch.Tensor, residual: torch.Tensor, k: int,
                               exact: bool = True, block_size: int | None = None):
    """The Triton implementation of :func:`topk_error_feedback` (one fused final pass)."""
    return _error_feedback(grad, residual, k, exact, block_size, "triton")
