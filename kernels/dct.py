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

Both are batched matmuls against a basis cached per (size, dtype, device) — on a GPU that
is cuBLAS, already at the hardware's limit for these shapes, so there is no separate
Triton kernel. 16-bit inputs are transformed in float32 and returned in their dtype.
Empty inputs give empty outputs.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch

from .dispatch import check_float

Chunk = Union[int, Sequence[int]]


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
              device: Union[str, torch.device] = "cpu") -> torch.Tensor:
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


def dct_chunks(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Chunked orthonormal DCT-II of a 1-D or 2-D tensor (shapes: module docstring)."""
    check_float(x, "x")
    cdt = _compute_dtype(x.dtype)
    if x.dim() == 1:
        c = dct_chunk_size(x.numel(), _chunk_pair(chunk)[0])
        blocks = x.to(cdt).reshape(-1, c)
        return (blocks @ dct_basis(c, cdt, x.device).T).to(x.dtype)
    if x.dim() == 2:
        rows, cols = x.shape
        cr = dct_chunk_size(rows, _chunk_pair(chunk)[0])
        cc = dct_chunk_size(cols, _chunk_pair(chunk)[1])
        grid = x.to(cdt).reshape(rows // cr, cr, cols // cc, cc).permute(0, 2, 1, 3)
        out = dct_basis(cr, cdt, x.device) @ grid @ dct_basis(cc, cdt, x.device).T
        return out.to(x.dtype)
    raise ValueError(f"dct_chunks takes a 1-D or 2-D tensor, got {x.dim()}-D")


def idct_chunks(coeffs: torch.Tensor, chunk: Optional[Chunk] = None) -> torch.Tensor:
    """Inverse of :func:`dct_chunks`: ``[m, c]`` -> 1-D, ``[R, S, cr, cs]`` -> 2-D."""
    check_float(coeffs, "coeffs")
    cdt = _compute_dtype(coeffs.dtype)
    if coeffs.dim() == 2:
        c = coeffs.shape[1]
        if chunk is not None and c > _chunk_pair(chunk)[0]:
            raise ValueError(f"coefficient chunks of {c} exceed chunk={chunk}")
        if c == 0:
            return coeffs.reshape(-1)
        x = coeffs.to(cdt) @ dct_basis(c, cdt, coeffs.device)
        return x.reshape(-1).to(coeffs.dtype)
    if coeffs.dim() == 4:
        nr, nc, cr, cc = coeffs.shape
        if chunk is not None:
            want_r, want_c = _chunk_pair(chunk)
            if cr > want_r or cc > want_c:
                raise ValueError(f"coefficient chunks {cr}x{cc} exceed chunk={chunk}")
        if cr == 0 or cc == 0:
            return coeffs.new_zeros(nr * cr, nc * cc)
        x = dct_basis(cr, cdt, coeffs.device).T @ coeffs.to(cdt) @ dct_basis(cc, cdt, coeffs.device)
        return x.permute(0, 2, 1, 3).reshape(nr * cr, nc * cc).to(coeffs.dtype)
    raise ValueError(f"idct_chunks takes 2-D (1-D chunks) or 4-D (2-D chunks) coefficients, "
                     f"got {coeffs.dim()}-D")
