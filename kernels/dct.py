"""Chunked orthonormal DCT-II and its inverse, for DeMo.

A vector (1-D) or matrix (2-D) is cut into chunks whose side along each dimension is
``dct_chunk_size(dim, chunk)``: the largest divisor of the dimension that is <= the
requested chunk, so chunks tile the tensor exactly with no padding. Each chunk is
transformed with the orthonormal DCT-II basis (``C[f, i] = sqrt(2/N) cos(pi (2i+1) f / 2N)``,
row 0 scaled by ``1/sqrt(2)``), so the inverse is the transpose and the transform keeps the
Euclidean norm.

``dct_chunks(x, chunk)``
    1-D ``x`` of n elements -> coefficients ``[n / c, c]`` (one row per chunk).
    2-D ``x`` of ``(r, s)`` -> ``[r / cr, s / cs, cr, cs]`` (chunk grid, then the chunk's
    2-D coefficients); ``chunk`` is an int or a ``(chunk_r, chunk_c)`` pair.
``idct_chunks(coeffs, chunk=None)``
    The inverse: a 2-D coefficient tensor gives back the 1-D vector, a 4-D one the matrix.
    The chunk sides are read from the coefficient shape; ``chunk``, when given, is checked.

Both are matmuls against a basis cached per (size, dtype, device) — on a GPU that is
cuBLAS, already at the hardware's limit for these shapes, so there is no separate Triton
kernel. 16-bit inputs are transformed in float32 and returned in their dtype. Empty
inputs give empty outputs.

Implementations (``dispatch.backend``; ``*_cpu`` and ``*_torch`` force one): for CPU
tensors the fast CPU form, otherwise (CUDA, or ``COMMRT_KERNELS=torch|triton``) the torch
reference, which broadcasts the basis over the chunk grid (one batched matmul per side).
The fast form does a 2-D transform as two large GEMMs and one permuting copy: the row
side as one ``[cr, cr] @ [cr, cols]`` product per row of chunks (the input's own layout),
the copy into the chunk-grid layout, the column side as one ``[numel / cc, cc] @ [cc, cc]``
product; no batch of tiny per-chunk products. 1-D chunks are one GEMM in both forms (the
fast form converts 16-bit inputs chunk by chunk instead of as a whole). The two forms
agree to float rounding (another summation order).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .dispatch import backend, check_float

Chunk = int | Sequence[int]


def dct_chunk_size(dim: int, chunk: int) -> int:
    """The largest divisor of ``dim`` that is <= ``chunk`` (1 for an empty dimension)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    if dim == 0:
        return 1
    best = 1
    for d in range(1, math.isqrt(dim) + 1):
        if dim % d == 0:
            for c in (d, dim // d):
                if best < c <= chunk:
                    best = c
    return best


@functools.lru_cache(maxsize=64)
def dct_basis(size: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[size, size]`` (rows = frequencies), cached."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    i = torch.arange(size, dtype=torch.float64)
    f = i[:, None]
    basis = torch.cos(math.pi * (2.0 * i[None, :] + 1.0) * f / (2.0 * size))
    basis *= math.sqrt(2.0 / size)
    basis[0] /= math.sqrt(2.0)
    return basis.to(dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _chunk_pair(chunk: Chunk) -> tuple[int, int]:
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        return chunk, chunk
    pair = tuple(chunk)
    if len(pair) != 2:
        raise ValueError(f"chunk must be an int or a pair of ints, got {chunk!r}")
    return int(pair[0]), int(pair[1])


_CPU_ROWS = 1 << 12
"""Chunks per step of the fast 1-D form's 16-bit conversion (its float32 temporaries)."""


def _dct_1d_cpu(x: torch.Tensor, c: int, inverse: bool) -> torch.Tensor:
    """1-D chunks ``[m, c]`` -> coefficients (or back): one GEMM, 16-bit converted per step."""
    cdt = _compute_dtype(x.dtype)
    basis = dct_basis(c, cdt, x.device)
    mat = basis if inverse else basis.T
    if x.dtype == cdt:
        return torch.mm(x, mat)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for r in range(0, x.shape[0], _CPU_ROWS):
        out[r:r + _CPU_ROWS] = torch.mm(x[r:r + _CPU_ROWS].to(cdt), mat)
    return out


def _dct_2d_cpu(x: torch.Tensor, cr: int, cc: int) -> torch.Tensor:
    rows, cols = x.shape
    nr, nc = rows // cr, cols // cc
    cdt = _compute_dtype(x.dtype)
    # rows: Br @ x[block row] for every row of chunks, in x's layout [nr, cr, cols]
    y = torch.matmul(dct_basis(cr, cdt, x.device), x.to(cdt).reshape(nr, cr, cols))
    # a real copy (.contiguous() may return y itself, and y is overwritten next)
    grid = torch.empty(nr, nc, cr, cc, dtype=cdt, device=x.device)
    grid.copy_(y.view(nr, cr, nc, cc).transpose(1, 2))
    # columns: one GEMM over every chunk row, written over y (no longer needed)
    out = torch.mm(grid.view(-1, cc), dct_basis(cc, cdt, x.device).T, out=y.view(-1, cc))
    return out.view(nr, nc, cr, cc).to(x.dtype)


def _idct_2d_cpu(coeffs: torch.Tensor) -> torch.Tensor:
    nr, nc, cr, cc = coeffs.shape
    cdt = _compute_dtype(coeffs.dtype)
    # columns: one GEMM over every chunk row, in the chunk-grid layout
    t = torch.mm(coeffs.to(cdt).reshape(-1, cc), dct_basis(cc, cdt, coeffs.device))
    z = torch.empty(nr, cr, nc, cc, dtype=cdt, device=coeffs.device)   # a real copy, as above
    z.copy_(t.view(nr, nc, cr, cc).transpose(1, 2))
    # rows: Br^T @ z[block row], written over t (no longer needed)
    out = torch.matmul(dct_basis(cr, cdt, coeffs.device).T, z.view(nr, cr, nc * cc),
                       out=t.view(nr, cr, nc * cc))
    return out.view(nr * cr, nc * cc).to(coeffs.dtype)


def _dct(x: torch.Tensor, chunk: Chunk, impl: str | None) -> torch.Tensor:
    check_float(x, "x")
    if impl is None:
        impl = "cpu" if backend(x) == "cpu" else "torch"
    cdt = _compute_dtype(x.dtype)
    if x.dim() == 1:
        c = dct_chunk_size(x.numel(), _chunk_pair(chunk)[0])
        if impl == "cpu":
            return _dct_1d_cpu(x.reshape(-1, c), c, inverse=False)
        blocks = x.to(cdt).reshape(-1, c)
        return (blocks @ dct_basis(c, cdt, x.device).T).to(x.dtype)
    if x.dim() == 2:
        rows, cols = x.shape
        cr = dct_chunk_size(rows, _chunk_pair(chunk)[0])
        cc = dct_chunk_size(cols, _chunk_pair(chunk)[1])
        if impl == "cpu" and x.numel():
            return _dct_2d_cpu(x, cr, cc)
        grid = x.to(cdt).reshape(rows // cr, cr, cols // cc, cc).permute(0, 2, 1, 3)
        out = dct_basis(cr, cdt, x.device) @ grid @ dct_basis(cc, cdt, x.device).T
        return out.to(x.dtype)
    raise ValueError(f"dct_chunks takes a 1-D or 2-D tensor, got {x.dim()}-D")


def dct_chunks(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Chunked orthonormal DCT-II of a 1-D or 2-D tensor (shapes: module docstring).

    Dispatches (``dispatch.backend``): the fast CPU form for CPU tensors, else the torch
    reference. ValueError on non-float dtypes, other ranks, chunk <= 0.
    """
    return _dct(x, chunk, None)


def dct_chunks_torch(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The torch reference of :func:`dct_chunks` (the basis broadcast over the chunk grid)."""
    return _dct(x, chunk, "torch")


def dct_chunks_cpu(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The fast CPU form of :func:`dct_chunks` (large GEMMs; any device works)."""
    return _dct(x, chunk, "cpu")


def _idct(coeffs: torch.Tensor, chunk: Chunk | None, impl: str | None) -> torch.Tensor:
    check_float(coeffs, "coeffs")
    if impl is None:
        impl = "cpu" if backend(coeffs) == "cpu" else "torch"
    cdt = _compute_dtype(coeffs.dtype)
    if coeffs.dim() == 2:
        c = coeffs.shape[1]
        if chunk is not None and c > _chunk_pair(chunk)[0]:
            raise ValueError(f"coefficient chunks of {c} exceed chunk={chunk}")
        if c == 0:
            return coeffs.reshape(-1)
        if impl == "cpu":
            return _dct_1d_cpu(coeffs, c, inverse=True).reshape(-1)
        x = coeffs.to(cdt) @ dct_basis(c, cdt, coeffs.device)
        return x.reshape(-1).to(coeffs.dtype)
    if coeffs.dim() == 4:
        nr, nc, cr, cc = coeffs.shape
        if chunk is not None:
            want_r, want_c = _chunk_pair(chunk)
            if cr > want_r or cc > want_c:
                raise ValueError(f"coefficient chunks {cr}x{cc} exceed chunk={chunk}")
        if cr == 0 or cc == 0 or coeffs.numel() == 0:
            return coeffs.new_zeros(nr * cr, nc * cc)
        if impl == "cpu":
            return _idct_2d_cpu(coeffs)
        x = dct_basis(cr, cdt, coeffs.device).T @ coeffs.to(cdt) @ dct_basis(cc, cdt, coeffs.device)
        return x.permute(0, 2, 1, 3).reshape(nr * cr, nc * cc).to(coeffs.dtype)
    raise ValueError(f"idct_chunks takes 2-D (1-D chunks) or 4-D (2-D chunks) coefficients, "
                     f"got {coeffs.dim()}-D")


def idct_chunks(coeffs: torch.Tensor, chunk: Chunk | None = None) -> torch.Tensor:
    """Inverse of :func:`dct_chunks`: ``[m, c]`` -> 1-D, ``[R, S, cr, cs]`` -> 2-D.

    Dispatches as :func:`dct_chunks`. ValueError on non-float dtypes, other ranks, or
    coefficient chunks larger than ``chunk`` (when given).
    """
    return _idct(coeffs, chunk, None)


def idct_chunks_torch(coeffs: torch.Tensor, chunk: Chunk | None = None) -> torch.Tensor:
    """The torch reference of :func:`idct_chunks`."""
    return _idct(coeffs, chunk, "torch")


def idct_chunks_cpu(coeffs: torch.Tensor, chunk: Chunk | None = None) -> torch.Tensor:
    """The fast CPU form of :func:`idct_chunks`."""
    return _idct(coeffs, chunk, "cpu")
