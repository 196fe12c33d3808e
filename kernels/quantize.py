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

round() is half away from zero (``floor(|v| + 0.5)`` with the sign), on every path, and
every path computes in float32 the same steps, each rounded once (so the codes agree bit
for bit): ``scale = absmax / qmax``, ``v = x * ((1 / absmax) * qmax)``.
All-zero blocks have scale 0 and decode to 0. ``q.data`` is uint8 with
``ceil(numel * bits / 8)`` bytes (block_size is a multiple of 8, so blocks start on
byte boundaries), ``q.scales`` float32 ``[ceil(numel / block_size)]``, so the wire size is
``quantized_nbytes(numel, bits, block_size) = ceil(numel * bits / 8) + 4 * num_blocks``.

Error feedback: with ``residual`` (same shape and device as x, float, contiguous) the
quantized tensor is ``x + residual`` (computed in float32) and the residual becomes
``x + residual_old - dequantize(q)`` in the same pass. ``quantize_(x, ...)`` instead
leaves x's own quantization error in x, ``x - dequantize(q)`` in x's dtype, in the same
pass (for a caller whose X already is the new residual); both ``quantize_`` and
``dequantize`` can write into given tensors (``out=``), e.g. views of a message buffer.

NaN/Inf in the quantized input raise ``ValueError`` (detected per block in the same
pass; with a residual, the residual then holds unspecified values).

Implementations (``dispatch.backend`` picks one; ``*_triton``, ``*_cpu`` and ``*_torch``
force one): the Triton kernels (one fused pass), the fast CPU path and the torch
reference. The fast CPU path walks the tensor in chunks of whole blocks (about
``CPU_CHUNK`` elements, so that its temporaries stay in cache; they are per-thread work
tensors reused across chunks and calls) and makes one pass over memory: read x (and the
residual), write the codes (and the residual, or x for ``quantize_``). Chunks run one
after the other, each op on ``torch.get_num_threads()`` threads (torch's own intra-op
parallelism; spreading chunks over threads as well would oversubscribe); the 1-bit sign
compare and bit (un)packing use numpy (``packbits``/``unpackbits``). Its codes and
dequantized values are bit-identical to the reference's (the same float32 operations);
the 1-bit scales may differ from the reference's in the last bits (a sum in another
order), and so may 1-bit residuals.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import backend, check_float, lazy_jit, require_cpu, require_triton, tl

_QMAX = {8: 127, 4: 7}

CPU_CHUNK = 1 << 18
"""Elements per chunk of the fast CPU path (rounded to whole blocks): 1 MiB float32
temporaries, small enough for L2/L3, large enough that per-op overhead stays small."""


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
                         HAS_RES: tl.constexpr, IN_PLACE: tl.constexpr, IS_F64: tl.constexpr,
                         BITS: tl.constexpr, PER_BYTE: tl.constexpr, BYTES_P2: tl.constexpr):
        blk = tl.program_id(0).to(tl.int64)
        byte_in_blk = tl.arange(0, BYTES_P2)
        j = tl.arange(0, PER_BYTE)
        local = byte_in_blk[:, None] * PER_BYTE + j[None, :]
        offs = blk * block_size + local
        mask = (local < block_size) & (offs < numel)
        raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = raw.to(tl.float32)
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
            # The module's formulas, each step IEEE-rounded: a GPU's default f32 division
            # is off by up to 2 ulp, and a 1-ulp change of `inv` moves a value lying near a
            # rounding midpoint to the next code.
            qmax_f = tl.full([], qmax, tl.float32)
            scale = tl.math.div_rn(absmax, qmax_f)
            safe = tl.where(absmax > 0, absmax, 1.0)
            inv = tl.where(absmax > 0, tl.math.div_rn(1.0, safe) * qmax_f, 0.0)
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
        if IN_PLACE:   # x - dequantize(q): x_hat rounded to x's dtype, subtracted in it
            if IS_F64:
                err = raw - x_hat.to(tl.float64)
            else:   # 16-bit: as torch, the difference of the two in float32, rounded once
                err = raw.to(tl.float32) - x_hat.to(raw.dtype).to(tl.float32)
            tl.store(x_ptr + offs, err.to(x_ptr.dtype.element_ty), mask=mask)

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


def _quantize_torch(x: torch.Tensor, res: torch.Tensor | None, bits: int, block_size: int):
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
        inv = torch.where(absmax > 0, absmax.reciprocal() * qmax, torch.zeros_like(absmax))
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
# Fast CPU path: chunks of whole blocks, each a handful of vectorised torch (and, for the
# bit packing, numpy) ops on cache-resident temporaries
# ----------------------------------------------------------------------------------------
def _cpu_spans(n: int, block_size: int) -> list[tuple[int, int]]:
    step = max(1, CPU_CHUNK // block_size) * block_size
    return [(s, min(n, s + step)) for s in range(0, n, step)]


_scratch = threading.local()


def _work(name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread work tensor of ``size`` elements, reused across chunks and calls: the
    chunk temporaries then stay in cache, and no fresh pages are faulted in per chunk (a
    fresh allocation per chunk costs about as much as the pass over it). Outsized requests
    (a block longer than a chunk) are one-offs, not kept."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.dtype != dtype or buf.numel() < size:
        buf = torch.empty(size, dtype=dtype)
        if size <= 2 * CPU_CHUNK:
            setattr(_scratch, name, buf)
    return buf[:size]


def _as_f32(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """src (a chunk) in float32: itself, or rounded into buf (as ``.to(torch.float32)``)."""
    if src.dtype == torch.float32:
        return src
    out = buf[:src.numel()]
    out.copy_(src)
    return out


def _quantize_cpu(flat: torch.Tensor, res: torch.Tensor | None, bits: int,
                  block_size: int, inplace: bool = False,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The fast CPU quantize: with `res`, error feedback into it; with `inplace`, flat
    itself becomes the error flat - x_hat (in flat's dtype). `out`: (data, scales) to
    write into, else fresh."""
    require_cpu(flat) if res is None else require_cpu(flat, res)
    # numpy views below refuse tensors that require grad; nothing here is differentiable
    flat = flat.detach()
    res = res.detach() if res is not None else None
    n, bs = flat.numel(), block_size
    if out is None:
        data = torch.empty((n * bits + 7) // 8, dtype=torch.uint8)
        scales = torch.empty(-(-n // bs), dtype=torch.float32)
    else:
        data, scales = out
    feedback = res is not None or inplace

    def run(span: tuple[int, int]) -> None:
        s, e = span
        m = e - s
        mb = -(-m // bs)
        mp = mb * bs
        t = _work("t", mp, torch.float32)
        # v = x (+ residual) in float32, as the reference: each rounded to float32, then
        # added; only read below, so a float32 x without residual is used in place.
        if res is None and m == mp and flat.dtype == torch.float32:
            v = flat[s:e]
        else:
            v = _work("v", mp, torch.float32)
            xs = _as_f32(flat[s:e], v)
            if res is not None:
                torch.add(xs, _as_f32(res[s:e], t), out=v[:m])
            elif xs.data_ptr() != v.data_ptr():
                v[:m].copy_(xs)
            v[m:].zero_()                  # a short last block, padded as the reference
        vb, tb = v.view(mb, bs), t.view(mb, bs)
        torch.abs(v, out=t)
        absmax = tb.amax(1)                # NaN propagates: the NaN/Inf check reads scales
        if bits == 1:
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            torch.div(vb, safe[:, None], out=tb)
            count = torch.full((mb,), float(bs))
            count[-1] = m - (mb - 1) * bs
            scale = absmax * torch.sqrt(t.mul_(t).view(mb, bs).sum(1) / count)
            # numpy's compare and bit packing: torch's boolean compare is several times
            # slower on one thread (measured); x >= 0 holds for -0.0 in both
            pos = _work("pos", mp, torch.bool)
            pos_np = pos.numpy()
            np.greater_equal(v.numpy(), 0, out=pos_np)
            pos_np[m:] = False             # bits past numel are 0, as the reference
            nbytes = -(-m // 8)
            packed = np.packbits(pos_np, bitorder="little")
            data[s // 8:s // 8 + nbytes] = torch.from_numpy(packed[:nbytes])
            if feedback:
                # x_hat = (2 bit - 1) * scale: int8 * float32 multiplies vectorise where a
                # broadcast torch.where does not
                sign = torch.mul(pos.view(torch.int8), 2, out=_work("codes", mp, torch.int8))
                torch.mul(sign.sub_(1).view(mb, bs), scale[:, None], out=tb)
        else:
            qmax = _QMAX[bits]
            scale = absmax / qmax
            inv = torch.where(absmax > 0, absmax.reciprocal() * qmax, torch.zeros_like(absmax))
            torch.mul(vb, inv[:, None], out=tb)
            # Round half away from zero: w + copysign(0.5, w) (the sign bit of w over the
            # bits of 0.5), truncated by the int8 conversion. Float addition is symmetric
            # in sign, so this is sign(w) * floor(|w| + 0.5) bit for bit.
            half = torch.bitwise_and(t.view(torch.int32), -0x80000000,
                                     out=_work("half", mp, torch.int32))
            t.add_(half.bitwise_or_(0x3F000000).view(torch.float32))
            codes = _work("codes", mp, torch.int8)
            codes.copy_(t)
            if bits == 8:
                data[s:e].view(torch.int8).copy_(codes[:m])
            else:
                # nibbles c + 8: byte = (c_even + 8) + 16 (c_odd + 8) = c_even + 16 c_odd + 136
                # (mod 256); c_even + 16 c_odd is within int8, + 136 wraps in uint8.
                pair = torch.add(codes[0::2], codes[1::2], alpha=16).view(torch.uint8)
                data[s // 2:s // 2 + -(-m // 2)] = pair[:-(-m // 2)].add_(136)
            if feedback:
                t.copy_(codes)
                tb.mul_(scale[:, None])
        scales[s // bs:s // bs + mb] = scale
        if inplace:
            # the reference's x - dequantize(q): x_hat in x's dtype, subtracted in it
            if flat.dtype == torch.float32:
                torch.sub(flat[s:e], t[:m], out=flat[s:e])
            else:
                flat[s:e].sub_(t[:m].to(flat.dtype))
        elif res is not None:
            if res.dtype == torch.float32:
                torch.sub(v[:m], t[:m], out=res[s:e])
            else:
                res[s:e].copy_(torch.sub(v[:m], t[:m], out=t[:m]))

    for span in _cpu_spans(n, bs):
        run(span)
    if bits == 4 and n % 2:
        data[-1] &= 0x0F                   # the high nibble past numel is 0, as the reference
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("quantize input" + (" + residual" if res is not None else "")
                         + " contains NaN or Inf")
    return data, scales


def _dequantize_cpu(q: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    require_cpu(q.data, q.scales)
    n, bits, bs = q.numel, q.bits, q.block_size
    if out is None:
        out = torch.empty(n, dtype=q.dtype)
    data = q.data.contiguous()
    scales = q.scales.contiguous()

    def run(span: tuple[int, int]) -> None:
        s, e = span
        m = e - s
        mb = -(-m // bs)
        mp = mb * bs
        scale = scales[s // bs:s // bs + mb]
        direct = q.dtype == torch.float32 and m == mp
        dst = out[s:e] if direct else _work("t", mp, torch.float32)
        if bits == 1:
            nbytes = -(-m // 8)
            # numpy's bit unpacking (little: bit j of byte i is element 8i + j), several
            # times faster than torch bit arithmetic (measured)
            bit = np.unpackbits(data[s // 8:s // 8 + nbytes].numpy(), bitorder="little")
            if bit.size == mp:
                sign = torch.from_numpy(bit).view(torch.int8)
            else:
                sign = _work("codes", mp, torch.int8)
                sign[:bit.size] = torch.from_numpy(bit).view(torch.int8)
                sign[bit.size:].zero_()
            sign.mul_(2).sub_(1)                                  # 2 bit - 1, as in quantize
            torch.mul(sign.view(mb, bs), scale[:, None], out=dst.view(mb, bs))
        else:
            if bits == 8 and m == mp:
                codes = data[s:e].view(torch.int8)
            elif bits == 8:
                codes = _work("codes", mp, torch.int8)
                codes[:m] = data[s:e].view(torch.int8)
                codes[m:].zero_()
            else:
                nbytes = -(-m // 2)
                src = data[s // 2:s // 2 + nbytes]
                nib = _work("codes", mp, torch.int8).view(torch.uint8)
                nib[2 * nbytes:].zero_()
                torch.bitwise_and(src, 0x0F, out=nib[0:2 * nbytes:2])
                torch.bitwise_right_shift(src, 4, out=nib[1:2 * nbytes:2])
                codes = nib.sub_(8).view(torch.int8)      # code - 8, wrapped into int8
            # int8 * float32 -> float32: the reference's float(code) * scale, exactly
            torch.mul(codes.view(mb, bs), scale[:, None], out=dst.view(mb, bs))
        if not direct:
            out[s:e].copy_(dst[:m])

    for span in _cpu_spans(n, bs):
        run(span)
    return out


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def _check_out(out, n: int, bits: int, block_size: int, device) -> None:
    if out is None:
        return
    data, scales = out
    nb = -(-n // block_size)
    if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8
            and data.numel() == (n * bits + 7) // 8 and data.is_contiguous()
            and isinstance(scales, torch.Tensor) and scales.dtype == torch.float32
            and scales.numel() == nb and scales.is_contiguous()
            and data.device == device and scales.device == device):
        raise ValueError(f"out must be (data, scales): contiguous uint8 of {(n * bits + 7) // 8}"
                         f" and float32 of {nb} elements on {device}")


def _quantize(x: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None,
              impl: str | None, inplace: bool = False,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
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
    if inplace and not x.is_contiguous():
        raise ValueError("x must be contiguous (it is updated in place)")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nb = -(-n // block_size)
    _check_out(out, n, bits, block_size, x.device)
    if impl is None:
        impl = backend(flat) if res is None else backend(flat, res)
    if impl == "triton" and n:
        require_triton(flat)
        if out is None:
            data = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=x.device)
            scales = torch.empty(nb, dtype=torch.float32, device=x.device)
        else:
            data, scales = out
        _quantize_kernel[(nb,)](flat, res if res is not None else flat, data, scales, n,
                                block_size, HAS_RES=res is not None, IN_PLACE=inplace,
                                IS_F64=flat.dtype == torch.float64, BITS=bits, PER_BYTE=8 // bits,
                                BYTES_P2=_bytes_p2(bits, block_size))
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("quantize input" + (" + residual" if res is not None else "")
                             + " contains NaN or Inf")
    elif impl == "cpu":
        data, scales = _quantize_cpu(flat, res, bits, block_size, inplace, out)
    else:
        data, scales = _quantize_torch(flat, res, bits, block_size)
        if out is not None:
            out[0].copy_(data)
            out[1].copy_(scales)
            data, scales = out
        if inplace:
            flat.sub_(_dequantize_torch(QuantizedTensor(data, scales, n, bits, block_size,
                                                        x.dtype)))
    return QuantizedTensor(data, scales, n, bits, block_size, x.dtype)


def quantize(x: torch.Tensor, bits: int, block_size: int = 256,
             residual: torch.Tensor | None = None, *,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """Quantize flat x to ``bits`` (8, 4 or 1) with one float32 scale per block.

    See the module docstring for the formats and error bounds. ``residual`` enables error
    feedback (updated in place). ``out``: optional ``(data, scales)`` to write into (as
    :func:`quantize_`). ValueError on bad bits/block_size, non-float dtypes, residual
    shape/device mismatch, a bad ``out``, NaN/Inf. Dispatches (``dispatch.backend``) to
    Triton, the fast CPU path or the torch reference.
    """
    return _quantize(x, bits, block_size, residual, None, out=out)


def quantize_torch(x: torch.Tensor, bits: int, block_size: int = 256,
                   residual: torch.Tensor | None = None, *,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """The torch reference of :func:`quantize`."""
    return _quantize(x, bits, block_size, residual, "torch", out=out)


def quantize_cpu(x: torch.Tensor, bits: int, block_size: int = 256,
                 residual: torch.Tensor | None = None, *,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """The fast CPU implementation of :func:`quantize` (CPU tensors; one chunked pass)."""
    return _quantize(x, bits, block_size, residual, "cpu", out=out)


def quantize_triton(x: torch.Tensor, bits: int, block_size: int = 256,
                    residual: torch.Tensor | None = None, *,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """The Triton implementation of :func:`quantize` (one fused pass)."""
    return _quantize(x, bits, block_size, residual, "triton", out=out)


def quantize_(x: torch.Tensor, bits: int, block_size: int = 256, *,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """Quantize x (as :func:`quantize`) and leave its quantization error in x, in one pass:
    the result equals ``q = quantize(x); x.sub_(dequantize(q))`` (x_hat in x's dtype,
    subtracted in it). For error feedback where X itself becomes the new residual, without
    the separate dequantize pass and its full-size temporary. x must be contiguous.

    ``out``: optional ``(data, scales)`` to write the codes and scales into (contiguous
    uint8 and float32 of the sizes :func:`quantize` returns, on x's device), e.g. views
    of a send buffer; the returned QuantizedTensor then holds them. ValueError as
    :func:`quantize` (NaN/Inf: x then holds unspecified values), or for a bad ``out``.
    """
    return _quantize(x, bits, block_size, None, None, True, out)


def quantize_torch_(x: torch.Tensor, bits: int, block_size: int = 256, *,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """The torch reference of :func:`quantize_` (quantize, dequantize, subtract)."""
    return _quantize(x, bits, block_size, None, "torch", True, out)


def quantize_cpu_(x: torch.Tensor, bits: int, block_size: int = 256, *,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """The fast CPU implementation of :func:`quantize_` (one chunked pass)."""
    return _quantize(x, bits, block_size, None, "cpu", True, out)


def quantize_triton_(x: torch.Tensor, bits: int, block_size: int = 256, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> QuantizedTensor:
    """The Triton implementation of :func:`quantize_` (one fused pass)."""
    return _quantize(x, bits, block_size, None, "triton", True, out)


def _dequantize(q: QuantizedTensor, impl: str | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"dequantize takes a QuantizedTensor, got {type(q).__name__}")
    _check_params(q.bits, q.block_size)
    nb = -(-q.numel // q.block_size)
    if q.data.numel() != (q.numel * q.bits + 7) // 8 or q.scales.numel() != nb:
        raise ValueError("QuantizedTensor data/scales sizes do not match numel, bits, block_size")
    if out is not None and not (isinstance(out, torch.Tensor) and out.dtype == q.dtype
                                and out.numel() == q.numel and out.is_contiguous()
                                and out.device == q.data.device):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of {q.numel} elements "
                         f"on {q.data.device}")
    flat_out = out.view(-1) if out is not None else None
    if impl is None:
        impl = backend(q.data, q.scales)
    if q.numel == 0 or impl == "torch":
        x_hat = _dequantize_torch(q)
        if flat_out is None:
            return x_hat
        flat_out.copy_(x_hat)
        return out
    if impl == "cpu":
        result = _dequantize_cpu(q, flat_out)
        return out if out is not None else result
    require_triton(q.data)
    if flat_out is None:
        flat_out = torch.empty(q.numel, dtype=q.dtype, device=q.data.device)
    _dequantize_kernel[(nb,)](q.data.contiguous(), q.scales.contiguous(), flat_out, q.numel,
                              q.block_size, BITS=q.bits, PER_BYTE=8 // q.bits,
                              BYTES_P2=_bytes_p2(q.bits, q.block_size))
    return out if out is not None else flat_out


def dequantize(q: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat tensor of ``q.numel`` elements in ``q.dtype`` decoded from ``q`` (dispatched as
    :func:`quantize`); with ``out`` (contiguous, ``q.numel`` elements of ``q.dtype``, on
    q's device) written into it and returned."""
    return _dequantize(q, None, out)


def dequantize_torch(q: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of :func:`dequantize`."""
    return _dequantize(q, "torch", out)


def dequantize_cpu(q: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fast CPU implementation of :func:`dequantize` (CPU tensors)."""
    return _dequantize(q, "cpu", out)


def dequantize_triton(q: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton implementation of :func:`dequantize`."""
    return _dequantize(q, "triton", out)
