"""Choosing between the Triton kernels, the fast CPU kernels and the torch references.

The public kernels of :mod:`commrt.kernels` have up to three implementations with the same
signature and contract (each module says which): a Triton kernel (fast on CUDA tensors), a
fast CPU implementation (chunked passes over CPU memory, vectorised with numpy where
torch's CPU ops are slow, e.g. ``nonzero`` and boolean compares) and a torch reference
(any device, no Triton needed; simple on purpose: it is the tests' oracle, not a fast
path). :func:`backend` picks one per call:

``COMMRT_KERNELS`` (environment variable, read at every call)
    ``auto`` (default): Triton when every tensor is on a CUDA device and Triton is
    installed; the fast CPU kernels when every tensor is on the CPU; the torch reference
    otherwise (mixed or other devices, or CUDA without Triton).
    ``triton``: always Triton. CPU tensors then need ``TRITON_INTERPRET=1`` (Triton's
    interpreter, which is how the tests exercise the kernels on machines without a GPU).
    ``cpu``: always the fast CPU kernels (RuntimeError for tensors not on the CPU).
    ``torch``: always the torch reference.

Triton is imported guarded: ``import commrt.kernels`` works without it. Kernels are
declared with :func:`lazy_jit`, which hands them to ``triton.jit`` at their first launch,
so that ``TRITON_INTERPRET`` is honoured even when it is set after this package was
imported (Triton reads it when a function is jitted).
"""
from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

try:  # guarded: the torch references must work without triton installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

ENV_VAR = "COMMRT_KERNELS"
MODES = ("auto", "triton", "cpu", "torch")
BACKENDS = ("triton", "cpu", "torch")
"""What :func:`backend` returns: the implementation a call runs."""

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


def backend(*tensors: torch.Tensor) -> str:
    """The implementation this call should run on ``tensors``: one of :data:`BACKENDS`."""
    m = mode()
    if m == "torch":
        return "torch"
    if m == "triton":
        require_triton(*tensors)
        return "triton"
    if m == "cpu":
        require_cpu(*tensors)
        return "cpu"
    if triton is not None and all(t.is_cuda for t in tensors):
        return "triton"
    if all(t.device.type == "cpu" for t in tensors):
        return "cpu"
    return "torch"


def require_cpu(*tensors: torch.Tensor) -> None:
    """RuntimeError unless every tensor is on the CPU (the fast CPU kernels' requirement)."""
    if not all(t.device.type == "cpu" for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"the fast CPU kernels need CPU tensors, got {', '.join(devices)}")


def require_triton(*tensors: torch.Tensor) -> None:
    """RuntimeError unless the Triton kernels can run on ``tensors`` here."""
    if triton is None:
        raise RuntimeError("the Triton kernels need triton (pip install triton)")
    if not all(t.is_cuda for t in tensors) and not interpreter_enabled():
        raise RuntimeError(
            "Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1")


T = TypeVar("T")
R = TypeVar("R")
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def cpu_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(item) for item in items]``, spread over ``torch.get_num_threads()`` threads.

    For the fast CPU kernels' chunked passes: numpy and torch release the GIL inside their
    loops, so chunks run in parallel; the caller's thread budget (``torch.set_num_threads``)
    is honoured, and with one thread everything runs inline, in order.
    """
    global _pool, _pool_workers
    items = list(items)
    workers = torch.get_num_threads()
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with _pool_lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="commrt-cpu")
            _pool_workers = workers
        pool = _pool
    return list(pool.map(fn, items))


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
