"""Tensors as MPI buffers: dtype and reduction tables, and the staging of tensors MPI
cannot read or write in place.

Data-movement operations travel as raw bytes; reductions use the matching MPI datatype,
with float16/bfloat16 upcast to float32 for the reduction because MPI has no portable
half-precision type (a sum of raw bytes as integers would be silently wrong).

CUDA tensors go to MPI directly when the library is CUDA-aware (`library.cuda_aware`),
after synchronising the producing stream, since mpi4py never synchronises streams.
Otherwise they are staged through reusable pinned host buffers and copied back on
completion. Non-contiguous tensors, and half-precision ones in a reduction, are staged in
a contiguous copy the same way.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from .library import cuda_aware, load_mpi


class _PinnedPool:
    """Reusable page-locked host buffers, so staging does not pin memory per call."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(nbytes - 1, 0).bit_length()  # round up: reuse across nearby sizes
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)


_pinned = _PinnedPool()

_REDUCE_OPS = ("sum", "max", "min", "product", "band", "bor", "bxor")
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


_DATATYPES: dict = {}
_OPS: dict = {}
_BOOL_OPS: dict = {}


def _build_tables() -> None:
    """Map torch dtypes and reduction names to MPI objects, once (the hot path looks up)."""
    MPI = load_mpi()
    _DATATYPES.update({
        torch.float64: MPI.DOUBLE, torch.float32: MPI.FLOAT,
        torch.int8: MPI.INT8_T, torch.int16: MPI.INT16_T, torch.int32: MPI.INT32_T,
        torch.int64: MPI.INT64_T, torch.uint8: MPI.UINT8_T, torch.bool: MPI.C_BOOL,
        torch.complex64: MPI.C_FLOAT_COMPLEX, torch.complex128: MPI.C_DOUBLE_COMPLEX,
    })
    _OPS.update({"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "product": MPI.PROD,
                 "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR})
    # torch's convention for bool: sum/max/bor are OR, product/min/band are AND.
    _BOOL_OPS.update({"sum": MPI.LOR, "max": MPI.LOR, "bor": MPI.LOR, "min": MPI.LAND,
                      "product": MPI.LAND, "band": MPI.LAND, "bxor": MPI.LXOR})


def _mpi_datatype(dtype: torch.dtype):
    if not _DATATYPES:
        _build_tables()
    try:
        return _DATATYPES[dtype]
    except KeyError:
        raise ValueError(f"commrt cannot reduce tensors of dtype {dtype}") from None


_reduce_specs: dict[tuple, tuple] = {}


def mpi_reduction(op: str, dtype: torch.dtype) -> tuple:
    """(MPI.Op, MPI datatype, whether the data is upcast first) of reduction `op` on
    tensors of `dtype`; cached, as every reduction looks it up."""
    spec = _reduce_specs.get((op, dtype))
    if spec is None:
        wire_dtype = _UPCAST.get(dtype, dtype)
        spec = _reduce_specs[(op, dtype)] = \
            _reduce_spec(op, wire_dtype) + (wire_dtype is not dtype,)
    return spec


def _reduce_spec(op: str, dtype: torch.dtype) -> tuple:
    if not _OPS:
        _build_tables()
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; expected one of {', '.join(_REDUCE_OPS)}")
    if dtype == torch.bool:
        return _BOOL_OPS[op], _mpi_datatype(dtype)
    if op in ("band", "bor", "bxor") and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"bitwise reduction {op!r} needs an integer or bool tensor, got {dtype}")
    if op in ("max", "min") and dtype.is_complex:
        raise ValueError(f"{op!r} is not defined for complex tensors")
    return _OPS[op], _mpi_datatype(dtype)


def tensor_nbytes(t: torch.Tensor) -> int:
    """The bytes of `t`'s elements."""
    return t.numel() * t.element_size()


def as_buffer(t: torch.Tensor, nbytes: int | None = None) -> Any:
    """An mpi4py buffer over the bytes of contiguous tensor `t` (host or device memory);
    `nbytes`, where the caller knows it, spares computing it again."""
    size = tensor_nbytes(t) if nbytes is None else nbytes
    return load_mpi().buffer.fromaddress(t.data_ptr(), size)


class Staged:
    """The contiguous, MPI-reachable tensor an operation works on, and how to copy back.

    `work` is what MPI reads or writes. It is `t` itself when `t` is already contiguous,
    of a wire dtype and reachable by MPI; otherwise a copy (contiguous, upcast, or in pinned
    host memory), and `finish()` writes the result back into `t`.
    """

    __slots__ = ("orig", "work", "pinned", "writeback")

    def __init__(self, t: torch.Tensor, *, reduce: bool, writeback: bool):
        self.orig = t
        self.pinned = None
        self.writeback = False
        dtype = _UPCAST.get(t.dtype, t.dtype) if reduce else t.dtype
        if t.is_cpu and dtype is t.dtype and t.is_contiguous():
            self.work = t  # the common case, decided without building a torch.device
            return
        on_device = t.device.type != "cpu"
        if on_device and t.device.type != "cuda":
            raise ValueError(f"commrt transport supports CPU and CUDA tensors, got {t.device}")
        if on_device and cuda_aware():
            work = t if (t.is_contiguous() and dtype == t.dtype) else t.contiguous().to(dtype)
            # mpi4py does not synchronise streams: the producer must be done before MPI reads.
            torch.cuda.current_stream(t.device).synchronize()
        elif on_device:
            nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
            self.pinned = _pinned.take(nbytes)
            work = self.pinned[:nbytes].view(dtype).view(t.shape)
            work.copy_(t)  # device-to-host from pageable view: synchronous w.r.t. the stream
        elif t.is_contiguous() and dtype == t.dtype:
            work = t
        else:
            work = t.contiguous().to(dtype) if dtype != t.dtype else t.contiguous()
        self.work = work
        self.writeback = writeback and work is not t

    def finish(self) -> None:
        if self.writeback:
            self.orig.copy_(self.work)
        if self.pinned is not None:
            _pinned.give(self.pinned)
            self.pinned = None


def stage_in(t: torch.Tensor, reduce: bool = False) -> tuple[torch.Tensor, tuple]:
    """(the tensor MPI reads, the staging to finish on completion: () when none)."""
    return stage(t, reduce, False)


def stage_out(t: torch.Tensor, reduce: bool = False) -> tuple[torch.Tensor, tuple]:
    """(the tensor MPI writes, the staging that copies it back on completion)."""
    return stage(t, reduce, True)


def stage(t: torch.Tensor, reduce: bool, writeback: bool) -> tuple[torch.Tensor, tuple]:
    """(the tensor MPI uses for `t`, the staging to finish on completion: () when none);
    `reduce`: upcast half precision; `writeback`: copy the result back into `t`."""
    # The common case (a contiguous CPU tensor of a wire dtype) allocates nothing: this is
    # on every call's path.
    if t.is_cpu and t.is_contiguous() and not (reduce and t.dtype in _UPCAST):
        return t, ()
    staged = Staged(t, reduce=reduce, writeback=writeback)
    return staged.work, (staged,)

