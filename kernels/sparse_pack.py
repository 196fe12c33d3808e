"""Sparse pack/unpack (values + block-local indices in one byte buffer) and scatter-add.

Byte layout of ``pack_sparse(values, indices, block_size)`` (little-endian), for ``k``
entries of a block of ``block_size`` elements::

    offset 0   u8   magic 0xC5
    offset 1   u8   format version (1)
    offset 2   u8   value dtype code: 0 float16, 1 bfloat16, 2 float32, 3 float64
    offset 3   u8   index width in bytes: 2 (uint16, block_size <= 65536) or 4 (int32)
    offset 4   u32  k, the number of entries
    offset 8        k values in their dtype
    offset 8 + align4(k * itemsize)    k block-local indices (uint16 or int32)

so ``packed_nbytes(k, dtype, block_size) = 8 + align4(k * itemsize) + k * index_width``.
The header lets a receiver post one buffer sized for the largest message and read the
actual count; the 4-byte alignment lets both arrays be viewed in place. Several packed
blocks can travel as one message by concatenating buffers (each is self-describing).

``scatter_add_(dense, indices, values)`` adds ``values`` at ``indices`` of a dense
accumulator (duplicates summed: atomics on the Triton path, so the summation order of
duplicates, and thus the last bits of the result, may vary on a GPU; the torch reference
is deterministic). ``scatter_add_packed_(dense, buffers, offsets, block_size)`` adds many
received blocks, the i-th at ``dense[offsets[i] + local_index]``.

Pack/unpack and scatter-add move data only: NaN/Inf are carried, not checked.

Three implementations (see ``dispatch``): Triton, fast CPU and the torch reference. They
differ only where it pays: the fast CPU pack writes the header and the alignment padding
and leaves the rest of the buffer to the two copies, where the reference zero-fills the
whole buffer first. Unpack and scatter-add are single copies / one ``index_add_`` on the
CPU already, so their CPU variants run the reference's code.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import torch

from .dispatch import backend, check_float, lazy_jit, require_cpu, require_triton, tl

HEADER_BYTES = 8
MAGIC = 0xC5
VERSION = 1
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_PACK_BLOCK = 1024


def _align4(n: int) -> int:
    return (n + 3) & ~3


def index_width(block_size: int) -> int:
    """Bytes per packed index: 2 (uint16) when a block holds at most 65,536 elements."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_size > 2**31:
        raise ValueError(f"block_size={block_size} exceeds the int32 index range")
    return 2 if block_size <= 65536 else 4


def _index_dtype(block_size: int) -> torch.dtype:
    return torch.uint16 if index_width(block_size) == 2 else torch.int32


def packed_nbytes(k: int, dtype: torch.dtype, block_size: int) -> int:
    """Exact size in bytes of a packed block of ``k`` entries (header included)."""
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"unsupported value dtype {dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return HEADER_BYTES + _align4(k * itemsize) + k * index_width(block_size)


def _views(buf: torch.Tensor, k: int, dtype: torch.dtype, block_size: int):
    itemsize = torch.empty(0, dtype=dtype).element_size()
    off = HEADER_BYTES + _align4(k * itemsize)
    values = buf[HEADER_BYTES: HEADER_BYTES + k * itemsize].view(dtype)
    indices = buf[off: off + k * index_width(block_size)].view(_index_dtype(block_size))
    return values, indices


def _header(k: int, dtype: torch.dtype, block_size: int) -> torch.Tensor:
    return torch.tensor([MAGIC, VERSION, _DTYPE_CODES[dtype], index_width(block_size),
                         k & 0xFF, (k >> 8) & 0xFF, (k >> 16) & 0xFF, (k >> 24) & 0xFF],
                        dtype=torch.uint8)


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
if tl is not None:

    @lazy_jit
    def _convert_kernel(src_val_ptr, src_idx_ptr, dst_val_ptr, dst_idx_ptr, k,
                        BLOCK: tl.constexpr):
        """dst_val = src_val, dst_idx = src_idx, each cast to its destination dtype."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < k
        v = tl.load(src_val_ptr + offs, mask=mask)
        i = tl.load(src_idx_ptr + offs, mask=mask)
        tl.store(dst_val_ptr + offs, v.to(dst_val_ptr.dtype.element_ty), mask=mask)
        tl.store(dst_idx_ptr + offs, i.to(dst_idx_ptr.dtype.element_ty), mask=mask)

    @lazy_jit
    def _scatter_add_kernel(dense_ptr, idx_ptr, val_ptr, k, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < k
        i = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
        v = tl.load(val_ptr + offs, mask=mask, other=0.0)
        tl.atomic_add(dense_ptr + i, v.to(dense_ptr.dtype.element_ty), mask=mask)


def _convert(src_val, src_idx, dst_val, dst_idx, impl: str) -> None:
    k = src_val.numel()
    if k == 0:
        return
    if impl == "triton":
        require_triton(src_val, dst_val)
        _convert_kernel[(_grid(k),)](src_val, src_idx, dst_val, dst_idx, k,
                                           BLOCK=_PACK_BLOCK)
    else:
        dst_val.copy_(src_val)
        dst_idx.copy_(src_idx)


def _grid(k: int) -> int:
    """Programs for k entries, _PACK_BLOCK per program."""
    return -(-k // _PACK_BLOCK)


# ----------------------------------------------------------------------------------------
# pack / unpack
# ----------------------------------------------------------------------------------------
def _pack(values: torch.Tensor, indices: torch.Tensor, block_size: int,
          impl: str | None) -> torch.Tensor:
    check_float(values, "values")
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool or indices.dtype.is_complex:
        raise ValueError("indices must be an integer tensor")
    values, indices = values.reshape(-1), indices.reshape(-1)
    if values.numel() != indices.numel():
        raise ValueError(f"{values.numel()} values but {indices.numel()} indices")
    if values.device != indices.device:
        raise ValueError(f"values and indices must be on the same device, got "
                         f"{values.device} and {indices.device}")
    k = values.numel()
    if k >= 2**32:
        raise ValueError(f"{k} entries exceed the u32 count of the format")
    index_width(block_size)
    if k:
        lo, hi = torch.aminmax(indices.to(torch.int64))
        if int(lo) < 0 or int(hi) >= block_size:
            raise ValueError(f"indices must lie in [0, {block_size}), got [{int(lo)}, {int(hi)}]")
    if impl is None:
        impl = backend(values, indices)
    nbytes = packed_nbytes(k, values.dtype, block_size)
    if impl == "cpu":
        require_cpu(values, indices)
        # Every byte is written exactly once: header, values, padding, indices.
        buf = torch.empty(nbytes, dtype=torch.uint8)
        buf[:HEADER_BYTES] = torch.frombuffer(bytearray(struct.pack(
            "<BBBBI", MAGIC, VERSION, _DTYPE_CODES[values.dtype], index_width(block_size), k)),
            dtype=torch.uint8)
        pad_start = HEADER_BYTES + k * values.element_size()
        buf[pad_start: HEADER_BYTES + _align4(k * values.element_size())] = 0
    else:
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=values.device)
        buf[:HEADER_BYTES] = _header(k, values.dtype, block_size).to(buf.device)
    dst_val, dst_idx = _views(buf, k, values.dtype, block_size)
    _convert(values.contiguous(), indices.contiguous(), dst_val, dst_idx, impl)
    return buf


def _read_header(buf: torch.Tensor, dtype: torch.dtype, block_size: int) -> int:
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError("a packed sparse buffer is a 1-D uint8 tensor")
    if buf.numel() < HEADER_BYTES:
        raise ValueError(f"packed buffer of {buf.numel()} bytes is shorter than its header")
    h = buf[:HEADER_BYTES].tolist()
    if h[0] != MAGIC or h[1] != VERSION:
        raise ValueError("not a packed sparse buffer (bad magic or version)")
    if _CODE_DTYPES.get(h[2]) != dtype:
        raise ValueError(f"buffer holds {_CODE_DTYPES.get(h[2])} values, asked for {dtype}")
    if h[3] != index_width(block_size):
        raise ValueError(f"buffer has {h[3]}-byte indices, block_size={block_size} "
                         f"implies {index_width(block_size)}")
    k = h[4] | (h[5] << 8) | (h[6] << 16) | (h[7] << 24)
    if buf.numel() < packed_nbytes(k, dtype, block_size):
        raise ValueError(f"buffer of {buf.numel()} bytes is truncated: {k} entries need "
                         f"{packed_nbytes(k, dtype, block_size)}")
    return k


def _unpack(buf: torch.Tensor, dtype: torch.dtype, block_size: int, impl: str | None):
    k = _read_header(buf, dtype, block_size)
    if buf.storage_offset() % 8:
        # A slice of a larger receive buffer: the in-place typed views need alignment.
        buf = buf[: packed_nbytes(k, dtype, block_size)].clone()
    src_val, src_idx = _views(buf, k, dtype, block_size)
    values = torch.empty(k, dtype=dtype, device=buf.device)
    indices = torch.empty(k, dtype=torch.int64, device=buf.device)
    if impl is None:
        impl = backend(buf)
    if impl == "cpu":
        require_cpu(buf)
    _convert(src_val, src_idx, values, indices, impl)
    return values, indices


def pack_sparse(values: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pack k (value, block-local index) pairs into one uint8 buffer (layout: module doc).

    ``indices`` (any integer dtype) must lie in ``[0, block_size)``; values keep their
    float dtype. ValueError on mismatched lengths/devices, non-float values, indices out
    of range. The buffer is on the values' device.
    """
    return _pack(values, indices, block_size, None)


def pack_sparse_torch(values: torch.Tensor, indices: torch.Tensor,
                      block_size: int) -> torch.Tensor:
    """The torch reference of :func:`pack_sparse`."""
    return _pack(values, indices, block_size, "torch")


def pack_sparse_cpu(values: torch.Tensor, indices: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """The fast CPU implementation of :func:`pack_sparse` (no zero-fill of the buffer)."""
    return _pack(values, indices, block_size, "cpu")


def pack_sparse_triton(values: torch.Tensor, indices: torch.Tensor,
                       block_size: int) -> torch.Tensor:
    """The Triton implementation of :func:`pack_sparse`."""
    return _pack(values, indices, block_size, "triton")


def unpack_sparse(buf: torch.Tensor, dtype: torch.dtype, block_size: int):
    """Inverse of :func:`pack_sparse`: ``(values [k] of dtype, indices [k] int64)``.

    ``buf`` may be longer than the packed data (a receive buffer sized for the largest
    message): the count comes from the header. It may also be an unaligned slice of a
    larger buffer (then the packed bytes are copied once). ValueError on a bad header, a dtype or
    block_size that does not match the buffer, or a truncated buffer.
    """
    return _unpack(buf, dtype, block_size, None)


def unpack_sparse_torch(buf: torch.Tensor, dtype: torch.dtype, block_size: int):
    """The torch reference of :func:`unpack_sparse`."""
    return _unpack(buf, dtype, block_size, "torch")


def unpack_sparse_cpu(buf: torch.Tensor, dtype: torch.dtype, block_size: int):
    """The CPU variant of :func:`unpack_sparse` (the reference's two copies, CPU only)."""
    return _unpack(buf, dtype, block_size, "cpu")


def unpack_sparse_triton(buf: torch.Tensor, dtype: torch.dtype, block_size: int):
    """The Triton implementation of :func:`unpack_sparse`."""
    return _unpack(buf, dtype, block_size, "triton")


# ----------------------------------------------------------------------------------------
# scatter-add
# ----------------------------------------------------------------------------------------
def _scatter_add(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 impl: str | None) -> torch.Tensor:
    check_float(dense, "dense")
    check_float(values, "values")
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool or indices.dtype.is_complex:
        raise ValueError("indices must be an integer tensor")
    if not dense.is_contiguous():
        raise ValueError("dense must be contiguous (it is updated in place)")
    if indices.numel() != values.numel():
        raise ValueError(f"{indices.numel()} indices but {values.numel()} values")
    if not (dense.device == indices.device == values.device):
        raise ValueError(f"dense, indices and values must share a device, got "
                         f"{dense.device}, {indices.device}, {values.device}")
    flat = dense.view(-1)
    idx = indices.reshape(-1).contiguous()
    vals = values.reshape(-1).contiguous()
    k = idx.numel()
    if k == 0:
        return dense
    lo, hi = torch.aminmax(idx.to(torch.int64))
    if int(lo) < 0 or int(hi) >= flat.numel():
        raise ValueError(f"indices must lie in [0, {flat.numel()}), got [{int(lo)}, {int(hi)}]")
    if impl is None:
        impl = backend(dense, idx, vals)
    if impl == "cpu":
        require_cpu(dense, idx, vals)
    if impl == "triton":
        require_triton(flat)
        _scatter_add_kernel[(_grid(k),)](flat, idx, vals, k, BLOCK=_PACK_BLOCK)
    else:
        flat.index_add_(0, idx.to(torch.int64), vals.to(flat.dtype))
    return dense


def scatter_add_(dense: torch.Tensor, indices: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """``dense.view(-1)[indices] += values`` with duplicates summed; returns dense.

    values are cast to dense's dtype. ValueError on indices outside ``[0, dense.numel())``,
    length or device mismatch, non-float tensors, a non-contiguous dense.
    """
    return _scatter_add(dense, indices, values, None)


def scatter_add_torch_(dense: torch.Tensor, indices: torch.Tensor,
                       values: torch.Tensor) -> torch.Tensor:
    """The torch reference of :func:`scatter_add_` (``index_add_``, deterministic)."""
    return _scatter_add(dense, indices, values, "torch")


def scatter_add_cpu_(dense: torch.Tensor, indices: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    """The CPU variant of :func:`scatter_add_` (the reference's ``index_add_``, CPU only)."""
    return _scatter_add(dense, indices, values, "cpu")


def scatter_add_triton_(dense: torch.Tensor, indices: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
    """The Triton implementation of :func:`scatter_add_` (atomic adds)."""
    return _scatter_add(dense, indices, values, "triton")


def scatter_add_packed_(dense: torch.Tensor, buffers: Iterable[torch.Tensor],
                        offsets: Sequence[int], block_size: int) -> torch.Tensor:
    """Add many packed blocks into dense: block i at ``dense.view(-1)[offsets[i] + idx]``.

    Each buffer is unpacked with dense's dtype; all entries go in one scatter-add launch.
    """
    buffers = list(buffers)
    if len(buffers) != len(offsets):
        raise ValueError(f"{len(buffers)} buffers but {len(offsets)} offsets")
    if not buffers:
        return dense
    vals, idxs = [], []
    for buf, off in zip(buffers, offsets):
        v, i = unpack_sparse(buf, dense.dtype, block_size)
        vals.append(v)
        idxs.append(i + int(off))
    return scatter_add_(dense, torch.cat(idxs), torch.cat(vals))
