"""The local tensor operations the sparse collectives need, on top of commrt.kernels.

Everything here runs on the tensors' own device (commrt.kernels dispatches to Triton for
CUDA tensors); only the packed uint8 buffers built here are handed to the transport.
"""
from __future__ import annotations

import torch

from commrt import kernels as K


class WorkBuffers:
    """Work tensors a call site keeps across calls, by (name, numel, dtype, device): a
    step then allocates only small temporaries (no fresh pages to fault in per step)."""

    def __init__(self) -> None:
        self._tensors: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The flat tensor kept under this key (contents left from its last use)."""
        key = (name, numel, dtype, device)
        buf = self._tensors.get(key)
        if buf is None:
            buf = self._tensors[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by magnitude of flat x: (values, int64 indices ascending); ties to the
    lower index, so ranks that hold identical data select identically."""
    return K.topk_magnitude(x, k, exact=True)


def topk_rows(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of every row of a (b, c) tensor: values (b, k), row-local indices (b, k)."""
    b, c = rows.shape
    if b == 0:
        return rows.new_empty((0, k)), torch.empty((0, k), dtype=torch.int64,
                                                   device=rows.device)
    values, indices = K.topk_blocks(rows.reshape(-1), c, k, exact=True)
    return values.reshape(b, k), indices.reshape(b, k).to(torch.int64)


def above_threshold(rows: torch.Tensor, thresholds: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of (s, c) `rows` with magnitude >= thresholds[row] (the rows' dtype):
    (values, row-major flat int64 positions, ascending). ValueError on NaN/Inf."""
    return K.above_threshold(rows, thresholds)


def scatter_add_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """dense[indices] += values (duplicates summed)."""
    if indices.numel():
        K.scatter_add_(dense, indices, values)


def pair_nbytes(count: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of `count` packed (value, block-local index) pairs."""
    return K.packed_nbytes(count, dtype, block_size)


def pack(values: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pack pairs (indices < block_size) into one uint8 buffer (commrt.kernels layout)."""
    return K.pack_sparse(values.reshape(-1), indices.reshape(-1), block_size)


def unpack(buf: torch.Tensor, dtype: torch.dtype, block_size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (values of `dtype`, int64 indices). `buf` may be a slice of a
    larger received buffer; one not aligned for in-place views is copied first."""
    if buf.storage_offset() % 8:
        buf = buf.clone()
    values, indices = K.unpack_sparse(buf, dtype, block_size)
    return values, indices.to(torch.int64)


# -- quantization ------------------------------------------------------------------------


def quantized_nbytes(numel: int, bits: int, block_size: int) -> int:
    """Wire bytes of `numel` values quantized to `bits` (codes + one fp32 scale per block)."""
    return K.quantized_nbytes(numel, bits, block_size)


def quantize_rows(x: torch.Tensor, rows: int, bits: int, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize flat x, viewed as `rows` equal rows whose length is a multiple of
    block_size: ((rows, row_nbytes) uint8, each row its codes then its scales' bytes;
    the dequantized x). Row r travels alone as one self-contained piece."""
    q = K.quantize(x, bits, block_size)
    data = q.data.view(rows, -1)
    scales = q.scales.view(rows, -1).view(torch.uint8)
    return torch.cat([data, scales], dim=1), K.dequantize(q)


def dequantize_rows(pieces: torch.Tensor, row_numel: int, bits: int, block_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_rows` for (rows, row_nbytes) pieces: (rows, row_numel)."""
    rows = pieces.shape[0]
    code_nbytes = row_numel * bits // 8
    data = pieces[:, :code_nbytes].reshape(-1)
    scales = pieces[:, code_nbytes:].contiguous().view(torch.float32).reshape(-1)
    q = K.QuantizedTensor(data=data, scales=scales, numel=rows * row_numel, bits=bits,
                          block_size=block_size, dtype=dtype)
    return K.dequantize(q).view(rows, row_numel)
