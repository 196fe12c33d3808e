"""Quantized allreduce with error feedback on both phases (8, 4 or 1 bit).

With X = tensor + residual on every rank, padded to P·c elements (c = ⌈n/P⌉ rounded up to
a multiple of the quantization block, 256 by default) and split into P chunks:

1. Every rank quantizes X (one fp32 scale per block: absmax for 8/4 bit, RMS with sign
   for 1 bit) and keeps the error, residual ← X − Q(X). An all-to-all sends chunk r of
   everyone's quantized X to rank r, which dequantizes and sums them (in rank order): S_r.
2. Rank r re-quantizes its chunk sum, and *adds the re-quantization error S_r − Q(S_r) to
   its own residual on chunk r*: the owner's next X carries it back into the sum (error
   feedback on the second phase with no state besides the residual). An all-gather
   distributes the P quantized chunk sums; every rank dequantizes them: tensor ← Q(S)/P.

So the same invariant as the sparse collectives holds for the user's residual alone:

    Σ_ranks residual_after + P · tensor_after == Σ_ranks (tensor + residual)_before

to float rounding (the owner's residual absorbs the phase-2 error of its chunk).

Wire bytes per rank: 2·(P−1)·q(c) with q(c) = c·bits/8 + 4·c/block (payload + scales):
(P−1)·q(c) in the all-to-all (kind "quant.all_to_all") and (P−1)/P·P·q(c) in the
all-gather (kind "quant.all_gather"); messages: one all-to-all and one all-gather.

X is formed in the residual itself when no padding is needed (float32/float64,
contiguous; for float32 inside the first quantization pass), else in a work buffer the
call site keeps. Each quantization writes its codes and scales straight into the message
buffer and leaves its error in place in the same pass (`commrt.kernels.quantize_`); the
received pieces are dequantized into the chunk sum and the result tensor directly, so a
call allocates no full-size temporaries. `last` splits the call's wall time into
transport waits and the rest (`commrt.collectives.timing`).
"""
from __future__ import annotations

from typing import Any

import torch

from . import local_ops as KK
from . import timing
from .inputs import agree, check_pair, dtype_code, resolve_group, work_dtype

BITS = (8, 4, 1)


def _param_error(bits: Any, block_size: Any) -> str | None:
    if bits not in BITS or isinstance(bits, bool):
        return f"bits={bits!r} must be one of {BITS}"
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 8 \
            or block_size % 8:
        return f"block_size={block_size!r} must be a positive multiple of 8"
    return None


class QuantizedAllreduce:
    """A quantized allreduce call site (see `quantized_allreduce` for the contract).

    Holds the configuration and the resolved group; the error-feedback state of both
    phases lives in the caller's residual. `last` describes the latest call.
    """

    def __init__(self, bits: int = 8, *, block_size: int = 256, group: Any = None) -> None:
        error = _param_error(bits, block_size)
        if error:
            raise ValueError(error)
        self.bits = bits
        self.block_size = block_size
        self.group = group
        self._comm = None
        self._buffers = KK.WorkBuffers()
        self.last: dict[str, Any] = {}

    @property
    def comm(self):
        if self._comm is None:
            self._comm = resolve_group(self.group)
        return self._comm

    def chunk_size(self, n: int, size: int) -> int:
        """Elements per rank chunk: ⌈n/P⌉ rounded up to a multiple of the block size."""
        per_rank = -(-n // size)
        return -(-per_rank // self.block_size) * self.block_size

    def __call__(self, tensor: torch.Tensor, residual: torch.Tensor, *,
                 validate: bool = True) -> torch.Tensor:
        comm = self.comm
        if validate:
            error = check_pair(tensor, residual) or _param_error(self.bits, self.block_size)
            is_tensor = isinstance(tensor, torch.Tensor)
            agree(comm, error, [tensor.numel() if is_tensor else -1,
                                dtype_code(tensor.dtype) if is_tensor else -1,
                                self.bits if self.bits in BITS else -1, 1, 0,
                                self.block_size if isinstance(self.block_size, int) else -1],
                  "quantized_allreduce")
        n = tensor.numel()
        if n == 0:
            self.last = {"n": 0}
            return tensor
        since = timing.mark()
        P, rank, bits, block = comm.size, comm.rank, self.bits, self.block_size
        dtype = work_dtype(tensor.dtype)
        c = self.chunk_size(n, P)
        # X = tensor + residual, padded to P·c, is built in the residual's own memory when
        # it can hold it (no padding, same dtype): phase 1 then turns it into the new
        # residual in place. Otherwise in a work buffer kept across calls.
        in_place = n == P * c and residual.dtype == dtype and residual.is_contiguous()
        # float32 (the usual gradient dtype): the quantization pass adds the tensor itself
        # (float32 arithmetic, as the kernels' residual mode computes), saving a full pass.
        fused_add = in_place and dtype == torch.float32 and tensor.dtype == dtype \
            and tensor.is_contiguous()
        if fused_add:
            x = residual.view(-1)
        elif in_place:
            x = residual.view(-1).add_(tensor.reshape(-1))
        else:
            x = self._buffers.get("x", P * c, dtype, tensor.device)
            torch.add(tensor.reshape(-1).to(dtype), residual.reshape(-1).to(dtype),
                      out=x[:n])
            x[n:].zero_()
        piece = KK.quantized_nbytes(c, bits, block)
        device = tensor.device

        # Phase 1: quantize straight into the send buffer, x becoming its own error (the
        # new residual) in the same pass; chunk r to rank r.
        send = self._buffers.get("send", P * piece, torch.uint8, device).view(P, piece)
        KK.quantize_rows_(x, send, bits, block, tensor.view(-1) if fused_add else None)
        recv = self._buffers.get("recv", P * piece, torch.uint8, device).view(P, piece)
        timing.wait(comm.ialltoall(send.view(-1), recv.view(-1), kind="quant.all_to_all"))
        # rows in rank order: a fixed order (only this rank sums this chunk)
        chunk_sum = self._buffers.get("sum", c, dtype, device)
        KK.dequantize_sum_rows_(recv, chunk_sum, bits, block,
                                self._buffers.get("row", c, dtype, device))

        # Phase 2: re-quantize the chunk sum; its error stays in the owner's residual.
        payload = self._buffers.get("payload", piece, torch.uint8, device).view(1, piece)
        KK.quantize_rows_(chunk_sum, payload, bits, block)
        x[rank * c:(rank + 1) * c] += chunk_sum
        gathered = self._buffers.get("gathered", P * piece, torch.uint8, device).view(P, -1)
        timing.wait(comm.iallgather(payload.view(-1), gathered.view(-1), kind="quant.all_gather"))
        if not in_place:
            residual.copy_(x[:n].view(residual.shape))
        direct = tensor.dtype == dtype and tensor.is_contiguous()
        out = tensor.view(-1) if direct else self._buffers.get("out", n, dtype, device)
        KK.dequantize_rows_(gathered, out, c, bits, block)
        out.div_(P)
        if not direct:
            tensor.copy_(out.view(tensor.shape))
        self.last = {"n": n, "bits": bits, "chunk": c, "piece_nbytes": piece,
                     **timing.split(since)}
        return tensor


def quantized_allreduce(tensor: torch.Tensor, residual: torch.Tensor, bits: int = 8, *,
                        block_size: int = 256, group: Any = None) -> torch.Tensor:
    """Quantized mean over ranks with two-phase error feedback, in place (collective).

    `tensor` becomes the mean over ranks of the dequantized two-phase sum (the same on
    every rank); `residual` the error this rank keeps, including, on its own chunk, the
    phase-2 re-quantization error, so that
    Σ_ranks residual_after + P·tensor_after == Σ_ranks (tensor + residual)_before.
    bits: 8 (int8, absmax scale), 4 (int4, absmax) or 1 (sign, RMS scale); one fp32 scale
    per `block_size` elements. group: None | Communicator | torch ProcessGroup.
    Wire bytes per rank: 2·(P−1)·(c·bits/8 + 4·c/block_size), c = per-rank chunk (module
    docstring). ValueError on every rank for bad bits, a residual of another
    shape/dtype/device, or sizes/dtypes differing across ranks. Empty tensors: no-op.
    """
    comm = resolve_group(group)
    error = _param_error(bits, block_size)
    if error:
        # Shared with every rank first (the same agreement the call below makes), so that
        # a mistake on one rank cannot leave the others waiting.
        agree(comm, error, [tensor.numel() if isinstance(tensor, torch.Tensor) else -1,
                            -1, -1, 1, 0, -1], "quantized_allreduce")
    return QuantizedAllreduce(bits, block_size=block_size, group=comm)(tensor, residual)
