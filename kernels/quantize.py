"""Block quantization: int8, int4 (two per byte) and 1-bit sign (eight per byte).

``q = quantize(x, bits, block_size=256, residual=None)`` splits flat x into blocks of
``block_size`` (the last may be shorter) with one float32 scale each:

* ``bits=8``: scale = absmax / 127, code = round(x / scale) in [-127, 127], stored as its
  two's-complement byte. |x - x_hat| <= scale / 2 = absmax / 254 (plus float rounding).
* ``bits=4``: scale = absmax / 7, code in [-7, 7] stored as the nibble code + 8; element
  2i in the low nibble, 2i + 1 in the high nibble. |x - x_hat| <= absmax / 14.
* ``bits=1``: scale = RMS of the block, computed as absmax * sqrt(mean((x / absmax)^2))
  so that it cannot overflow; bit = (x >= 0), element 8i + j in bit j of byte i;
  x_hat = +scale or -scale.

round() is half away from zero (``floor(|v| + 0.5)`` with the sign), on both paths.
All-zero blocks have scale 0 and decode to 0. ``q.data`` is uint8 with
``ceil(numel * bits / 8)`` bytes (block_size is a multiple of 8, so blocks start on
byte boundaries), ``q.scales`` float32 ``[ceil(numel / block_size)]``, so the wire size is
``quantized_nbytes(numel, bits, block_size) = ceil(numel * bits / 8) + 4 * num_blocks``.

Error feedback: with ``residual`` (same shape and device as x, float, contiguous) the
quantized tensor is ``x + residual`` (computed in float32) and the residual becomes
``x + residual_old - dequantize(q)`` in the same pass.

NaN/Inf in the quantized input raise ``ValueError`` (detected per block in the same
pass; with a residual, the residual then holds unspecified values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .dispatch import check_float, lazy_jit, require_triton, tl, use_triton

_QMAX = {8: 127, 4: 7}


@dataclass
class QuantizedTensor:
    """Quantized flat tensor: packed codes, per-block float32 scales and the metadata."""
    data: torch.Tensor       # uint8 [ceil(numel * bits / 8)]
    scales: torch.Tensor     # float32 [num_blocks]
    numel: int
    bits: int
    block_size: int
    dtype: torch.dtype       # dtype of the original tensor (dequantize returns it)

    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scales.numel()


def _check_params(bits: int, block_size: int) -> None:
    if bits not in (1, 4, 8):
        raise ValueError(f"bits must be 1, 4 or 8, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 \
            or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size!r}")


def quantized_nbytes(numel: int, bits: int, block_size: int = 256) -> int:
    """Bytes of ``quantize(x, bits, block_size)`` for ``numel`` elements (data + scales)."""
    _check_params(bits, block_size)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8 + 4 * (-(-numel // block_size))


# ----------------------------------------------------------------------------------------
# Triton kernels: one program per block, the block viewed as [bytes, elements per byte]
# ----------------------------------------------------------------------------------------
if tl is not None:

    @lazy_jit
    def _quantize_kernel(x_ptr, res_ptr, data_ptr, scale_ptr, numel, block_size,
                         HAS_RES: tl.constexpr, BITS: tl.constexpr, PER_BYTE: tl.constexpr,
                         BYTES_P2: tl.constexpr):
        blk = tl.program_id(0).to(tl.int64)
        byte_in_blk = tl.arange(0, BYTES_P2)
        j = tl.arange(0, PER_BYTE)
        local = byte_in_blk[:, None] * PER_BYTE + j[None, :]
        offs = blk * block_size + local
        mask = (local < block_size) & (offs < numel)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x = x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(x)
        bad = tl.sum(tl.sum(((a != a) | (a == float("inf"))).to(tl.int32), axis=1), axis=0)
        absmax = tl.max(tl.max(tl.where(mask, a, 0.0), axis=1), axis=0)
        if BITS == 1:
            count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            safe = tl.where(absmax > 0, absmax, 1.0)
            ratio = x / safe
            scale = absmax * tl.sqrt(tl.sum(tl.sum(ratio * ratio, axis=1), axis=0) / count)
            pos = x >= 0
            code = pos.to(tl.int32)
            x_hat = tl.where(pos, scale, -scale)
        else:
            qmax = (1 << (BITS - 1)) - 1
            scale = absmax / qmax
            inv = tl.where(absmax > 0, qmax / tl.where(absmax > 0, absmax, 1.0), 0.0)
            v = x * inv
            mag = tl.floor(tl.abs(v) + 0.5)
            q = tl.where(v < 0, -mag, mag).to(tl.int32)
            x_hat = q.to(tl.float32) * scale
            if BITS == 8:
                code = q & 0xFF
            else:
                code = q + 8
        shifted = code << (j[None, :] * BITS)
        byte = tl.sum(tl.where(mask, shifted, 0), axis=1)
        byte_offs = (blk * block_size) // PER_BYTE + byte_in_blk
        first = byte_in_blk * PER_BYTE   # the byte's first element in the block
        byte_mask = (first < block_size) & (blk * block_size + first < numel)
        tl.store(data_ptr + byte_offs, byte.to(tl.uint8), mask=byte_mask)
        tl.store(scale_ptr + blk, tl.where(bad > 0, float("nan"), scale))
        if HAS_RES:
            tl.store(res_ptr + offs, (x - x_hat).to(res_ptr.dtype.element_ty), mask=mask)

    @lazy_jit
    def _dequantize_kernel(data_ptr, scale_ptr, out_ptr, numel, block_size,
                           BITS: tl.constexpr, PER_BYTE: tl.constexpr, BYTES_P2: tl.constexpr):
        blk = tl.program_id(0).to(tl.int64)
        byte_in_blk = tl.arange(0, BYTES_P2)
        j = tl.arange(0, PER_BYTE)
        local = byte_in_blk[:, None] * PER_BYTE + j[None, :]
        offs = blk * block_size + local
        mask = (local < block_size) & (offs < numel)
        byte_offs = (blk * block_size) // PER_BYTE + byte_in_blk
        first = byte_in_blk * PER_BYTE   # the byte's first element in the block
        byte_mask = (first < block_size) & (blk * block_size + first < numel)
        byte = tl.load(data_ptr + byte_offs, mask=byte_mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + blk)
        code = (byte[:, None] >> (j[None, :] * BITS)) & ((1 << BITS) - 1)
        if BITS == 1:
            x_hat = tl.where(code == 1, scale, -scale)
        elif BITS == 4:
            x_hat = (code - 8).to(tl.float32) * scale
        else:
            x_hat = tl.where(code >= 128, code - 256, code).to(tl.float32) * scale
        tl.store(out_ptr + offs, x_hat.to(out_ptr.dtype.element_ty), mask=mask)


def _bytes_p2(bits: int, block_size: int) -> int:
    per_byte = 8 // bits
    return max(1, 1 << (block_size // per_byte - 1).bit_length())


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------
def _blocks_f32(v: torch.Tensor, block_size: int):
    """v (float32, flat) as [num_blocks, block_size], zero padded, plus the validity mask."""
    n = v.numel()
    nb = -(-n // block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=v.device)
    padded[:n] = v
    valid = torch.zeros(nb * block_size, dtype=torch.bool, device=v.device)
    valid[:n] = True
    return padded.view(nb, block_size), valid.view(nb, block_size)


def _quantize_torch(x: torch.Tensor, res: Optional[torch.Tensor], bits: int, block_size: int):
    v = x.to(torch.float32)
    if res is not None:
        v = v + res.to(torch.float32)
    n = v.numel()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("quantize input" + (" + residual" if res is not None else "")
                         + " contains NaN or Inf")
    blocks, valid = _blocks_f32(v, block_size)
    absmax = blocks.abs().amax(1)
    if bits == 1:
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        ratio = blocks / safe[:, None]
        scale = absmax * torch.sqrt((ratio * ratio).sum(1) / valid.sum(1).float())
        pos = blocks >= 0
        codes = pos.to(torch.int32)
        x_hat = torch.where(pos, scale[:, None], -scale[:, None])
    else:
        qmax = _QMAX[bits]
        scale = absmax / qmax
        inv = torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
        w = blocks * inv[:, None]
        mag = torch.floor(w.abs() + 0.5)
        q = torch.where(w < 0, -mag, mag).to(torch.int32)
        x_hat = q.to(torch.float32) * scale[:, None]
        codes = q & 0xFF if bits == 8 else q + 8
    per_byte = 8 // bits
    flat_codes = codes.reshape(-1)[:n]
    nbytes = (n * bits + 7) // 8
    padded = torch.zeros(nbytes * per_byte, dtype=torch.int32, device=x.device)
    padded[:n] = flat_codes
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.int32) * bits
    data = (padded.view(nbytes, per_byte) << shifts).sum(1).to(torch.uint8)
    if res is not None:
        res.copy_((v - x_hat.reshape(-1)[:n]).to(res.dtype))
    return data, scale


def _dequantize_torch(q: QuantizedTensor) -> torch.Tensor:
    n, bits = q.numel, q.bits
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=q.data.device, dtype=torch.int32) * bits
    codes = ((q.data.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    scale = q.scales.repeat_interleave(q.block_size)[:n]
    if bits == 1:
        x_hat = torch.where(codes == 1, scale, -scale)
    elif bits == 4:
        x_hat = (codes - 8).to(torch.float32) * scale
    else:
        x_hat = torch.where(codes >= 128, codes - 256, codes).to(torch.float32) * scale
    return x_hat.to(q.dtype)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def _quantize(x: torch.Tensor, bits: int, block_size: int, residual: Optional[torch.Tensor],
              triton) -> QuantizedTensor:
    check_float(x, "x")
    _check_params(bits, block_size)
    res = None
    if residual is not None:
        check_float(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"x shape {tuple(x.shape)} != residual shape {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"x and residual must be on the same device, got {x.device} "
                             f"and {residual.device}")
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous (it is updated in place)")
        res = residual.view(-1)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nb = -(-n // block_size)
    if triton is None:
        triton = use_triton(flat) if res is None else use_triton(flat, res)
    if triton and n:
        require_triton(flat)
        data = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=x.device)
        scales = torch.empty(nb, dtype=torch.float32, device=x.device)
        _quantize_kernel[(nb,)](flat, res if res is not None else flat, data, scales, n,
                                block_size, HAS_RES=res is not None, BITS=bits,
                                PER_BYTE=8 // bits, BYTES_P2=_bytes_p2(bits, block_size))
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("quantize input" + (" + residual" if res is not None else "")
                             + " contains NaN or Inf")
    else:
        data, scales = _quantize_torch(flat, res, bits, block_size)
    return QuantizedTensor(data, scales, n, bits, block_size, x.dtype)


def quantize(x: torch.Tensor, bits: int, block_size: int = 256,
             residual: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """Quantize flat x to ``bits`` (8, 4 or 1) with one float32 scale per block.

    See the module docstring for the formats and error bounds. ``residual`` enables error
    feedback (updated in place). ValueError on bad bits/block_size, non-float dtypes,
    residual shape/device mismatch, NaN/Inf.
    """
    return _quantize(x, bits, block_size, residual, None)


def quantize_torch(x: torch.Tensor, bits: int, block_size: int = 256,
                   residual: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """The torch reference of :func:`quantize`."""
    return _quantize(x, bits, block_size, residual, False)


def quantize_triton(x: torch.Tensor, bits: int, block_size: int = 256,
                    residual: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """The Triton implementation of :func:`quantize` (one fused pass)."""
    return _quantize(x, bits, block_size, residual, True)


def _dequantize(q: QuantizedTensor, triton) -> torch.Tensor:
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"dequantize takes a QuantizedTensor, got {type(q).__name__}")
    _check_params(q.bits, q.block_size)
    nb = -(-q.numel // q.block_size)
    if q.data.numel() != (q.numel * q.bits + 7) // 8 or q.scales.numel() != nb:
        raise ValueError("QuantizedTensor data/scales sizes do not match numel, bits, block_size")
    if triton is None:
        triton = use_triton(q.data, q.scales)
    if not triton or q.numel == 0:
        return _dequantize_torch(q)
    require_triton(q.data)
    out = torch.empty(q.numel, dtype=q.dtype, device=q.data.device)
    _dequantize_kernel[(nb,)](q.data.contiguous(), q.scales.contiguous(), out, q.numel,
                              q.block_size, BITS=q.bits, PER_BYTE=8 // q.bits,
                              BYTES_P2=_bytes_p2(q.bits, q.block_size))
    return out


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Flat tensor of ``q.numel`` elements in ``q.dtype`` decoded from ``q``."""
    return _dequantize(q, None)


def dequantize_torch(q: QuantizedTensor) -> torch.Tensor:
    """The torch reference of :func:`dequantize`."""
    return _dequantize(q, False)


def dequantize_triton(q: QuantizedTensor) -> torch.Tensor:
    """The Triton implementation of :func:`dequantize`."""
    return _dequantize(q, True)
