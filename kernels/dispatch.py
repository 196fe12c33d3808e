"""Choosing between the Triton kernels and their torch references.

Every public kernel of :mod:`commrt.kernels` has two implementations with the same
signature: a Triton kernel (fast on CUDA tensors) and a torch reference (any device, no
Triton needed). :func:`use_triton` picks one per call:

``COMMRT_KERNELS`` (environment variable, read at every call)
    ``auto`` (default): Triton when every tensor is on a CUDA device and Triton is
    installed, the torch reference otherwise.
    ``triton``: always Triton. CPU tensors then need ``TRITON_INTERPRET=1`` (Triton's
    interpreter, which is how the tests exercise the kernels on machines without a GPU).
    ``torch``: always the torch reference.

Triton is imported guarded: ``import commrt.kernels`` works without it. Kernels are
declared with :func:`lazy_jit`, which hands them to ``triton.jit`` at their first launch,
so that ``TRITON_INTERPRET`` is honoured even when it is set after this package was
imported (Triton reads it when a function is jitted).
"""
from __future__ import annotations

import operator
import os
from typing import Any, Callable

import torch

try:  # guarded: the torch references must work without triton installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

ENV_VAR = "COMMRT_KERNELS"
MODES = ("auto", "triton", "torch")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def mode() -> str:
    """The kernel selection mode from ``COMMRT_KERNELS`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


def triton_available() -> bool:
    return triton is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when this call should run the Triton kernel on ``tensors``."""
    m = mode()
    if m == "torch":
        return False
    if m == "auto":
        return triton is not None and all(t.is_cuda for t in tensors)
    require_triton(*tensors)
    return True


def require_triton(*tensors: torch.Tensor) -> None:
    """RuntimeError unless the Triton kernels can run on ``tensors`` here."""
    if triton is None:
        raise RuntimeError("the Triton kernels need triton (pip install triton)")
    if not all(t.is_cuda for t in tensors) and not interpreter_enabled():
        raise RuntimeError(
            "Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1")


class lazy_jit:
    """``triton.jit`` deferred to the first launch: ``kernel[grid](...)`` as usual."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Any:
        interpret = interpreter_enabled()
        jitted = self._jitted.get(interpret)
        if jitted is None:
            jitted = self._jitted[interpret] = _jit(self.fn, interpret)
        return jitted[grid]


def _jit(fn: Callable[..., Any], interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(fn)
    return triton.jit(fn)


def check_float(t: Any, name: str) -> torch.Tensor:
    """ValueError unless ``t`` is a floating-point tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    """The NaN/Inf policy of the selection and quantization kernels: a clear ValueError."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_k(k: Any, n: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            k = operator.index(k)
        except TypeError:
            raise ValueError(f"{what} must be an int, got {type(k).__name__}") from None
    if k < 0 or k > n:
        raise ValueError(f"{what}={k} out of range [0, {n}]")
    return int(k)
