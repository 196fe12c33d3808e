"""Top-k selection by magnitude: flat vectors and independent blocks, exact and approximate.

Public functions (dispatching between Triton, the fast CPU implementation and the torch
reference, see ``dispatch``; ``*_triton``, ``*_cpu`` and ``*_torch`` pick one explicitly):

``topk_magnitude(x, k, exact=True) -> (values, indices)``
    The k entries of flat ``x`` with the largest ``|x|``. ``indices`` are int64 and
    ascending, ``values = x[indices]``.
``topk_blocks(x, block_size, k, exact=True) -> (values, indices)``
    The same for every block of ``block_size`` consecutive entries (the last block may be
    shorter); indices are block-local.
``above_threshold(rows, thresholds) -> (values, indices)``
    The entries of each row of 2-D ``rows`` with ``|v| >= thresholds[row]`` (row-major
    flat indices): the fast CPU top-k's candidate pass on its own (fast CPU
    implementation and torch reference only).

Policies (every implementation, pinned by the tests):

* Exact mode returns exactly ``k`` entries; among equal magnitudes the lower index wins, so
  the result is deterministic.
* Approximate mode (``exact=False``), flat: returns every entry with ``|x| >= t`` for a
  threshold ``t`` whose count lands in ``[k, floor((1 + APPROX_EPS) * k)]``; should no
  such threshold exist (many ties), it returns exactly ``k`` (ties to the lower index).
  Every returned entry is at least as large as every entry left out. Which threshold is
  an implementation's choice: the Triton path and the torch reference agree with each
  other, the fast CPU path usually returns the exact selection.
* Approximate mode, blocks: exactly ``min(k, len(block))`` entries per block, each of them
  among the ``floor((1 + APPROX_EPS) * k)`` largest of its block: every entry above a
  threshold ``hi`` plus the lowest-index entries of the band ``[lo, hi)`` (the fast CPU
  path: the exact selection).
* NaN or Inf anywhere in the input raises ``ValueError`` (a gradient with them should not
  be compressed silently). ``k < 0``, ``k > n`` or a non-float dtype raise ``ValueError``.

Implementations: ``topk_search`` (the Triton kernels and the torch references: a
threshold search, described there) and ``topk_cpu`` (the fast CPU implementation, a third
algorithm: a sampled threshold, one candidate pass, the exact k-th among the candidates).
`run_select` picks one; the shared tolerance and bit patterns are in ``topk_policy``.
"""
from __future__ import annotations

import torch

from .dispatch import backend, check_finite, check_float, check_k
from .topk_cpu import above_threshold_rows, select_cpu
from .topk_policy import APPROX_EPS, approx_cap
from .topk_search import Rows, select_torch_exact, select_torch_search, select_triton

__all__ = [
    "APPROX_EPS", "approx_cap", "run_select",
    "topk_magnitude", "topk_magnitude_cpu", "topk_magnitude_torch", "topk_magnitude_triton",
    "topk_blocks", "topk_blocks_cpu", "topk_blocks_torch", "topk_blocks_triton",
    "above_threshold", "above_threshold_cpu", "above_threshold_torch",
]


def run_select(x: torch.Tensor, y: torch.Tensor | None, row_len: int, k: int,
               exact: bool, fixed_count: bool, impl: str):
    """The selection behind every public function of this module and ``error_feedback``.

    Selects, in each row of ``row_len`` consecutive entries of ``v = x`` (or, with ``y``,
    ``x.to(y.dtype) + y``; the last row may be shorter), ``min(k, len(row))`` entries by
    magnitude: exact with ties to the lower index when ``exact`` or ``fixed_count``, else
    the flat approximate policy of the module docstring. ``x`` (and ``y``) are flat and
    contiguous, ``k`` already checked. ``impl`` is a :data:`dispatch.BACKENDS` name.
    Returns ``(values, row-local indices, per-row counts)``. The Triton path also writes
    ``y <- v`` with the selected entries zeroed (fused error feedback); the others leave
    x and y untouched.
    """
    if impl == "triton":
        return select_triton(x, y, Rows.make(x.numel(), row_len, k, x.device), exact,
                             fixed_count)
    if impl == "cpu":
        return select_cpu(x, y, row_len, k, exact, fixed_count)
    rows = Rows.make(x.numel(), row_len, k, x.device)
    v = x.to(y.dtype) + y if y is not None else x
    check_finite(v, "grad + residual" if y is not None else "x")
    if exact:
        return select_torch_exact(v, rows)
    return select_torch_search(x, y, rows, exact, fixed_count)


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    check_float(x, name)
    return x.reshape(-1).contiguous()


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def _magnitude(x: torch.Tensor, k: int, exact: bool, impl: str | None):
    flat = _flat(x, "x")
    k = check_k(k, flat.numel())
    if flat.numel() == 0:
        return flat[:0], torch.zeros(0, dtype=torch.int64, device=flat.device)
    if impl is None:
        impl = backend(flat)
    values, indices, _ = run_select(flat, None, flat.numel(), k, exact, False, impl)
    return values, indices


def topk_magnitude(x: torch.Tensor, k: int, exact: bool = True):
    """Top-k of flat ``x`` by magnitude: ``(values, indices)``, indices int64 ascending.

    ``values = x[indices]`` (same dtype as x). Exact mode: exactly k entries, ties to the
    lower index. Approximate mode: between k and ``approx_cap(k)`` entries, all at least
    as large in magnitude as every entry left out. ValueError on k outside [0, n], a
    non-float dtype, NaN or Inf. Dispatches (``dispatch.backend``) to Triton, the fast CPU
    implementation or the torch reference.
    """
    return _magnitude(x, k, exact, None)


def topk_magnitude_torch(x: torch.Tensor, k: int, exact: bool = True):
    """The torch reference of :func:`topk_magnitude` (same contract)."""
    return _magnitude(x, k, exact, "torch")


def topk_magnitude_cpu(x: torch.Tensor, k: int, exact: bool = True):
    """The fast CPU implementation of :func:`topk_magnitude` (same contract; CPU tensors).

    Exact mode returns the reference's selection; approximate mode usually returns exactly
    the exact selection too (a threshold set within the tolerance, see the module doc).
    """
    return _magnitude(x, k, exact, "cpu")


def topk_magnitude_triton(x: torch.Tensor, k: int, exact: bool = True):
    """The Triton implementation of :func:`topk_magnitude` (same contract)."""
    return _magnitude(x, k, exact, "triton")


def _blocks(x: torch.Tensor, block_size: int, k: int, exact: bool, impl: str | None):
    flat = _flat(x, "x")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    k = check_k(k, block_size, "k (per block)")
    if flat.numel() == 0:
        return flat[:0], torch.zeros(0, dtype=torch.int64, device=flat.device)
    if impl is None:
        impl = backend(flat)
    values, indices, _ = run_select(flat, None, block_size, k, exact, True, impl)
    return values, indices


def topk_blocks(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """Top-k by magnitude in each block of ``block_size`` consecutive entries of flat x.

    Returns flat ``(values, indices)``: block after block, ``min(k, len(block))`` entries
    each (the last block may be shorter than block_size), indices block-local int64 and
    ascending within a block. When every block holds at least k entries the result views
    as ``(num_blocks, k)``. Exact mode: ties to the lower index. Approximate mode: still
    ``min(k, len)`` entries per block, each among the ``approx_cap(k)`` largest of its
    block (the fast CPU implementation returns the exact selection). ValueError on
    0 > k > block_size, block_size <= 0, non-float dtype, NaN/Inf.
    """
    return _blocks(x, block_size, k, exact, None)


def topk_blocks_torch(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The torch reference of :func:`topk_blocks`."""
    return _blocks(x, block_size, k, exact, "torch")


def topk_blocks_cpu(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The fast CPU implementation of :func:`topk_blocks` (exact selection in both modes)."""
    return _blocks(x, block_size, k, exact, "cpu")


def topk_blocks_triton(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The Triton implementation of :func:`topk_blocks`."""
    return _blocks(x, block_size, k, exact, "triton")


# ----------------------------------------------------------------------------------------
# The candidate pass on its own: entries at or above a per-row threshold
# ----------------------------------------------------------------------------------------
def _above(rows: torch.Tensor, thresholds: torch.Tensor, impl: str | None):
    check_float(rows, "rows")
    check_float(thresholds, "thresholds")
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (rows, columns), got shape {tuple(rows.shape)}")
    s, c = rows.shape
    if thresholds.shape != (s,) or thresholds.dtype != rows.dtype:
        raise ValueError(f"thresholds must be 1-D of length {s} and dtype {rows.dtype}, got "
                         f"shape {tuple(thresholds.shape)} and dtype {thresholds.dtype}")
    check_finite(thresholds, "thresholds")
    if impl is None:
        # No Triton kernel: on CUDA the reference's compare and nonzero are already fast.
        impl = "cpu" if backend(rows, thresholds) == "cpu" else "torch"
    if rows.numel() == 0:
        return rows.new_empty(0), torch.zeros(0, dtype=torch.int64, device=rows.device)
    if impl == "torch":
        check_finite(rows, "rows")
        flat = rows.reshape(-1)
        indices = (flat.abs() >= thresholds.repeat_interleave(c)).nonzero().view(-1)
        return flat[indices], indices
    return above_threshold_rows(rows, thresholds)


def above_threshold(rows: torch.Tensor, thresholds: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of 2-D ``rows`` (s, c) with ``|v| >= thresholds[row]``: ``(values,
    indices)``, indices int64 row-major flat positions (``row * c + column``), ascending,
    and ``values = rows.reshape(-1)[indices]``.

    ``thresholds``: 1-D of length s, the dtype of ``rows``, finite (a negative threshold
    selects the whole row). ValueError on NaN/Inf in rows or thresholds, a non-float
    dtype or mismatched shapes. This is the candidate pass of the fast CPU top-k, usable
    on its own (threshold reuse). Dispatches to the fast CPU implementation for CPU
    tensors and to the torch reference otherwise (no Triton kernel).
    """
    return _above(rows, thresholds, None)


def above_threshold_cpu(rows: torch.Tensor, thresholds: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast CPU implementation of :func:`above_threshold` (CPU tensors): one chunked
    numpy pass comparing the float bit patterns as integers."""
    return _above(rows, thresholds, "cpu")


def above_threshold_torch(rows: torch.Tensor, thresholds: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`above_threshold` (any device; same contract)."""
    return _above(rows, thresholds, "torch")
