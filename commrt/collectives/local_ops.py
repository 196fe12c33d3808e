"""The local tensor operations the sparse and quantized collectives need, on top of commrt.kernels.

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


def _row_parts(row: torch.Tensor, numel: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale bytes) of one (row_nbytes,) uint8 piece holding `numel` values."""
    code_nbytes = numel * bits // 8
    return row[:code_nbytes], row[code_nbytes:]


def quantize_rows_(x: torch.Tensor, out: torch.Tensor, bits: int, block_size: int,
                   addend: torch.Tensor | None = None) -> None:
    """Quantize flat x, viewed as out.shape[0] equal rows whose length is a multiple of
    block_size, into the (rows, row_nbytes) uint8 `out`: each row its codes then its
    scales' bytes, so row r travels alone as one self-contained piece. x becomes its
    quantization error x - dequantized(x) in the same pass (`commrt.kernels.quantize_`).
    With `addend` (float32 like x, same size) X = x + addend is formed in that pass too:
    the quantization is X's and x becomes X's error (`commrt.kernels.quantize` with x as
    the residual), bit for bit as `x += addend` first."""
    rows = out.shape[0]
    row_numel = x.numel() // rows
    for r in range(rows):
        codes, scale_bytes = _row_parts(out[r], row_numel, bits)
        # the scales go straight into the piece where its bytes are float32-aligned
        # (always for block_size a multiple of 32), else through a small temporary
        aligned = scale_bytes.storage_offset() % 4 == 0
        scales = scale_bytes.view(torch.float32) if aligned else \
            torch.empty(scale_bytes.numel() // 4, dtype=torch.float32, device=x.device)
        rows = slice(r * row_numel, (r + 1) * row_numel)
        if addend is None:
            K.quantize_(x[rows], bits, block_size, out=(codes, scales))
        else:
            K.quantize(addend[rows], bits, block_size, residual=x[rows], out=(codes, scales))
        if not aligned:
            scale_bytes.copy_(scales.view(torch.uint8))


def _row_quantized(row: torch.Tensor, row_numel: int, numel: int, bits: int,
                   block_size: int, dtype: torch.dtype) -> K.QuantizedTensor:
    """The first `numel` values of one piece of `quantize_rows_` as a QuantizedTensor."""
    codes, scale_bytes = _row_parts(row, row_numel, bits)
    if scale_bytes.storage_offset() % 4:
        scale_bytes = scale_bytes.clone()
    return K.QuantizedTensor(data=codes[:(numel * bits + 7) // 8],
                             scales=scale_bytes.view(torch.float32)[:-(-numel // block_size)],
                             numel=numel, bits=bits, block_size=block_size, dtype=dtype)


def dequantize_rows_(pieces: torch.Tensor, out: torch.Tensor, row_numel: int, bits: int,
                     block_size: int) -> None:
    """Inverse of `quantize_rows_` for (rows, row_nbytes) pieces, into flat `out` (its
    dtype): row r fills out[r·row_numel:], up to out's end (trailing padding is skipped)."""
    for r in range(pieces.shape[0]):
        start = r * row_numel
        numel = min(row_numel, out.numel() - start)
        if numel <= 0:
            break
        K.dequantize(_row_quantized(pieces[r], row_numel, numel, bits, block_size, out.dtype),
                     out=out[start:start + numel])


def dequantize_sum_rows_(pieces: torch.Tensor, out: torch.Tensor, bits: int,
                         block_size: int, scratch: torch.Tensor) -> None:
    """out = the sum of the dequantized rows of (rows, row_nbytes) `pieces` (each of
    out.numel() values), added in row order; `scratch`: a work tensor like out."""
    c = out.numel()
    for r in range(pieces.shape[0]):
        q = _row_quantized(pieces[r], c, c, bits, block_size, out.dtype)
        if r == 0:
            K.dequantize(q, out=out)
        else:
            out.add_(K.dequantize(q, out=scratch))
