"""What every top-k implementation shares: the approximate mode's tolerance, and
magnitudes compared as integer bit patterns (for non-negative floats the bit pattern is
monotonic, so thresholds can be searched and compared as integers).
"""
from __future__ import annotations

import math

import torch

APPROX_EPS = 0.05
"""Approximate top-k returns between k and floor((1 + APPROX_EPS) * k) entries."""

# The integer dtype of the same width as each float dtype: its bit pattern.
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float32: torch.int32, torch.float64: torch.int64}


def approx_cap(k: int) -> int:
    """The largest count approximate top-k may return for a budget of ``k``."""
    return int(math.floor((1.0 + APPROX_EPS) * k))


def to_bits(v: torch.Tensor) -> torch.Tensor:
    """The bit patterns of float tensor `v`, as int64."""
    return v.view(INT_VIEW[v.dtype]).to(torch.int64)


def from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The floats of `dtype` whose bit patterns are `bits` (inverse of `to_bits`)."""
    return bits.to(INT_VIEW[dtype]).view(dtype)
