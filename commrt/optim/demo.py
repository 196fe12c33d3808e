"""DeMo: decoupled momentum optimization (Peng, Quesnelle, Kingma 2024), over commrt.

Every rank keeps its own momentum δ and transmits only its fast-moving components: the
top-k DCT coefficients of each chunk of δ. What is sent is removed from δ; what is not sent
keeps accumulating locally (decoupled momentum). Per parameter and step:

    p ← p·(1 − lr·wd)
    δ ← β·δ + lr·g                                   (β = compression_decay)
    C = DCT-II(δ) over chunks                        (largest divisor ≤ chunk per dimension;
                                                      2-D chunks for ≥2-D weights)
    keep the top-k coefficients of each chunk by magnitude, δ ← δ − IDCT(kept)
    all-gather (chunk-local index, value) of every rank, scatter-mean into the chunks
    u = IDCT(mean);  p ← p − lr·sign(u)              (or p ← p − lr·u with sign=False)

Wire format. The public implementation sends int64 indices and fp32 values (12 bytes per
coefficient). Here a chunk holds at most 64×64 = 4096 coefficients, so chunk-local indices
travel as uint16 (12 bits used) and values as fp32 (6 bytes/coefficient), bf16 (4 bytes)
or 8-bit (3 bytes: int8 with one fp32 absmax scale per chunk, the scale's 32 bits stored in
the 4 spare high bits of the chunk's first 8 indices; a chunk with fewer than 8 kept
coefficients sends its scale as 4 extra bytes). With 8-bit values the decoded quantity is
the dequantized one, and it is also what is subtracted from δ, so the quantization error
stays in δ (error feedback) and nothing is lost.

All parameters travel in one all-gather per step. Per-rank wire bytes of one step, over a
process group of P ranks (the all-gather's (P−1)/P of the gathered array)::

    (P − 1) · Σ_tensors  nchunks_t · k_t · (2 + value_bytes)  [+ 4 · nchunks_t if 8-bit and k_t < 8]

with k_t = min(compression_topk, chunk elements of t). `DeMo.last_step_wire_bytes` holds
this number for the last step and `DeMo.payload_bytes()` the bracketed per-rank payload.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from commrt import transports as T

try:  # kernels may not provide every helper: fall back to the torch forms below
    from commrt import kernels as K
except Exception:  # pragma: no cover - an import error there must not break optimizers
    K = None

_SCALE_NIBBLES = 8  # an fp32 scale spread over 8 spare index nibbles


# --------------------------------------------------------------------------------------
# DCT over chunks


def chunk_size_for(n: int, max_chunk: int) -> int:
    """Largest divisor of n that is ≤ max_chunk (1 for n == 0)."""
    helper = getattr(K, "dct_chunk_size", None) if K is not None else None
    if helper is not None:
        return int(helper(n, max_chunk))
    if n <= 0:
        return 1
    for c in range(min(n, max_chunk), 0, -1):
        if n % c == 0:
            return c
    return 1


_bases: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _dct_basis(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    basis = _bases.get(key)
    if basis is None:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        basis = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
        basis[0] /= math.sqrt(2.0)
        basis = basis.to(dtype=dtype, device=device)
        _bases[key] = basis
    return basis


def _dct(x: torch.Tensor, chunk) -> torch.Tensor:
    """Chunked DCT-II: 1-D x -> (n/c, c); 2-D x -> (R/cr, C/cc, cr, cc) (kernels' layout)."""
    if K is not None and hasattr(K, "dct_chunks"):
        return K.dct_chunks(x, chunk)
    if x.dim() == 1:
        return x.reshape(-1, chunk) @ _dct_basis(chunk, x.dtype, x.device).T
    cr, cc = chunk
    rows, cols = x.shape
    grid = x.reshape(rows // cr, cr, cols // cc, cc).permute(0, 2, 1, 3)
    return _dct_basis(cr, x.dtype, x.device) @ grid @ _dct_basis(cc, x.dtype, x.device).T


def _idct(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of `_dct` (the chunk sides are read from the coefficient shape)."""
    if K is not None and hasattr(K, "idct_chunks"):
        return K.idct_chunks(coeffs)
    if coeffs.dim() == 2:
        return (coeffs @ _dct_basis(coeffs.shape[1], coeffs.dtype, coeffs.device)).reshape(-1)
    nr, nc, cr, cc = coeffs.shape
    x = (_dct_basis(cr, coeffs.dtype, coeffs.device).T @ coeffs
         @ _dct_basis(cc, coeffs.dtype, coeffs.device))
    return x.permute(0, 2, 1, 3).reshape(nr * cr, nc * cc)


@dataclass(frozen=True)
class ChunkLayout:
    """How one tensor is cut into DCT chunks: ``rows × cols`` blocks of ``cr × cc``.

    A 1-D (or 0-D) tensor of n elements is one row (``rows = 1, cr = 1``) cut into
    1-D chunks of ``cc``; a tensor with ≥ 2 dims is viewed as ``shape[0] × rest`` and cut
    into 2-D ``cr × cc`` blocks. Coefficient matrices are ``(nchunks, cr·cc)``.
    """

    shape: tuple[int, ...]
    rows: int
    cols: int
    cr: int
    cc: int

    @classmethod
    def for_tensor(cls, shape: Sequence[int], max_chunk: int, one_d: bool = False) -> "ChunkLayout":
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if one_d or len(shape) < 2:
            return cls(shape, 1, numel, 1, chunk_size_for(numel, max_chunk))
        rows, cols = shape[0], numel // shape[0]
        return cls(shape, rows, cols, chunk_size_for(rows, max_chunk),
                   chunk_size_for(cols, max_chunk))

    @property
    def chunk_elems(self) -> int:
        return self.cr * self.cc

    @property
    def nchunks(self) -> int:
        numel = self.rows * self.cols
        return numel // self.chunk_elems if numel else 0

    def to_coeffs(self, x: torch.Tensor) -> torch.Tensor:
        """(nchunks, chunk_elems) DCT coefficients of x (any shape with this numel)."""
        if self.cr == 1 and self.rows == 1:
            return _dct(x.reshape(-1), self.cc).reshape(-1, self.chunk_elems)
        return _dct(x.reshape(self.rows, self.cols), (self.cr, self.cc)).reshape(
            -1, self.chunk_elems)

    def from_coeffs(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_coeffs`, shaped like the tensor."""
        if self.cr == 1 and self.rows == 1:
            return _idct(coeffs.reshape(-1, self.cc)).reshape(self.shape)
        grid = coeffs.reshape(self.rows // self.cr, self.cols // self.cc, self.cr, self.cc)
        return _idct(grid).reshape(self.shape)


def topk_per_chunk(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by magnitude of every row of (nchunks, e): values and chunk-local int64 indices,
    each (nchunks, k)."""
    nchunks, elems = coeffs.shape
    if K is not None and hasattr(K, "topk_blocks"):
        values, indices = K.topk_blocks(coeffs.reshape(-1), elems, k)
        return values.reshape(nchunks, k), indices.reshape(nchunks, k).long()
    indices = coeffs.abs().topk(k, dim=1, sorted=False).indices
    return coeffs.gather(1, indices), indices


# --------------------------------------------------------------------------------------
# Wire codec: chunk-local uint16 indices, fp32 / bf16 / 8-bit values


_VALUE_BYTES = {32: 4, 16: 2, 8: 1}


class CoefficientCodec:
    """Packs the kept coefficients of a list of tensors into one uint8 payload per rank and
    turns the all-gathered payloads back into mean coefficient matrices.

    ``specs``: per tensor ``(nchunks, chunk_elems, k)``; every rank must hold the same list.
    """

    def __init__(self, specs: Sequence[tuple[int, int, int]], value_bits: int):
        if value_bits not in _VALUE_BYTES:
            raise ValueError(f"value_bits must be 32, 16 or 8, got {value_bits}")
        self.specs = [tuple(int(v) for v in s) for s in specs]
        self.value_bits = value_bits
        for nchunks, elems, k in self.specs:
            limit = 4096 if value_bits == 8 else 65536
            if elems > limit:
                raise ValueError(f"a DCT chunk of {elems} coefficients does not fit "
                                 f"{'12-bit' if value_bits == 8 else 'uint16'} indices")
        # per tensor: byte sizes of (indices, values, extra scales)
        self.parts = []
        for nchunks, elems, k in self.specs:
            n = nchunks * k
            extra = 4 * nchunks if value_bits == 8 and k < _SCALE_NIBBLES else 0
            self.parts.append((2 * n, _VALUE_BYTES[value_bits] * n, extra))
        self.payload_bytes = sum(sum(p) for p in self.parts)

    def wire_bytes(self, group_size: int) -> int:
        """Per-rank bytes of the all-gather of one payload per rank over group_size ranks."""
        return (group_size - 1) * (group_size * self.payload_bytes) // group_size \
            if group_size > 1 else 0

    def encode(self, kept: Sequence[tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """kept: per tensor (values, indices) of shape (nchunks, k). Returns the uint8
        payload and, per tensor, the values as the receivers will decode them (dequantized
        for 8-bit), to subtract from the momentum."""
        pieces: list[torch.Tensor] = []
        decoded_values: list[torch.Tensor] = []
        for (values, indices), (nchunks, elems, k) in zip(kept, self.specs):
            if nchunks == 0:
                decoded_values.append(values)
                continue
            idx = indices.to(torch.int32)
            extra = None
            if self.value_bits == 32:
                wire_vals = values.float().contiguous()
                sent = wire_vals
            elif self.value_bits == 16:
                wire_vals = values.to(torch.bfloat16).contiguous()
                sent = wire_vals.float()
            else:
                scale = values.float().abs().amax(dim=1).clamp_min(1e-30) / 127.0
                q = torch.round(values.float() / scale.unsqueeze(1)).clamp_(-127, 127)
                wire_vals = q.to(torch.int8)
                sent = q * scale.unsqueeze(1)
                if k >= _SCALE_NIBBLES:
                    # fp32 scale (positive, sign bit 0) -> 8 nibbles in bits 12..15
                    bits = scale.view(torch.int32).unsqueeze(1)
                    shifts = 4 * torch.arange(_SCALE_NIBBLES, dtype=torch.int32)
                    nibbles = (bits >> shifts) & 0xF
                    idx = idx.clone()
                    idx[:, :_SCALE_NIBBLES] |= nibbles << 12
                else:
                    extra = scale.contiguous()
            pieces.append(idx.to(torch.uint16).reshape(-1).view(torch.uint8))
            pieces.append(wire_vals.reshape(-1).view(torch.uint8))
            if extra is not None:
                pieces.append(extra.view(torch.uint8))
            decoded_values.append(sent.to(values.dtype))
        payload = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
        return payload, decoded_values

    def decode_mean(self, gathered: torch.Tensor, ranks: int, dtype: torch.dtype
                    ) -> list[torch.Tensor]:
        """gathered: (ranks · payload_bytes) uint8, rank-major. Returns per tensor the
        (nchunks, chunk_elems) mean over ranks of the sent sparse coefficient matrices."""
        rows = gathered.view(ranks, self.payload_bytes)
        out: list[torch.Tensor] = []
        offset = 0
        for (nchunks, elems, k), (ib, vb, eb) in zip(self.specs, self.parts):
            dense = torch.zeros(nchunks, elems, dtype=torch.float32)
            if nchunks == 0:
                out.append(dense.to(dtype))
                continue
            idx = rows[:, offset:offset + ib].reshape(-1).clone().view(torch.uint16).to(torch.int32)
            idx = idx.view(ranks, nchunks, k)
            raw = rows[:, offset + ib:offset + ib + vb].reshape(-1).clone()  # offset 0: viewable
            if self.value_bits == 32:
                vals = raw.view(torch.float32).view(ranks, nchunks, k)
            elif self.value_bits == 16:
                vals = raw.view(torch.bfloat16).float().view(ranks, nchunks, k)
            else:
                q = raw.view(torch.int8).float().view(ranks, nchunks, k)
                if k >= _SCALE_NIBBLES:
                    shifts = 4 * torch.arange(_SCALE_NIBBLES, dtype=torch.int32)
                    nibbles = (idx[:, :, :_SCALE_NIBBLES] >> 12) & 0xF
                    scale = (nibbles << shifts).sum(dim=2, dtype=torch.int32).view(torch.float32)
                    idx = idx & 0xFFF
                else:
                    scale = rows[:, offset + ib + vb:offset + ib + vb + eb].reshape(-1).clone()
                    scale = scale.view(torch.float32).view(ranks, nchunks)
                vals = q * scale.unsqueeze(2)
            offset += ib + vb + eb
            flat_idx = idx.long() + (torch.arange(nchunks) * elems).view(1, nchunks, 1)
            _scatter_add(dense.view(-1), flat_idx.reshape(-1), vals.reshape(-1).float())
            out.append((dense / ranks).to(dtype))
        return out


def _scatter_add(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    if K is not None and hasattr(K, "scatter_add_"):
        K.scatter_add_(dense, indices, values)
    else:
        dense.index_add_(0, indices, values)


def _sparse_to_dense(values: torch.Tensor, indices: torch.Tensor, elems: int) -> torch.Tensor:
    dense = torch.zeros(values.shape[0], elems, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, indices, values)


# --------------------------------------------------------------------------------------
# The optimizer


class _WireBytesInStateDict:
    """Optimizer mixin: `last_step_wire_bytes` travels in the state dict (for resume)."""

    last_step_wire_bytes: int

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["last_step_wire_bytes"] = self.last_step_wire_bytes
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.last_step_wire_bytes = int(state_dict.pop("last_step_wire_bytes", 0))
        super().load_state_dict(state_dict)


class DeMo(_WireBytesInStateDict, torch.optim.Optimizer):
    """Decoupled-momentum optimizer (see the module docstring for the rule and wire format).

    Args:
        params: parameters (identical shapes and order on every rank of the group).
        lr: learning rate; it scales both the momentum input and the (sign) update.
        compression_decay: β of the momentum δ ← β·δ + lr·g.
        compression_topk: coefficients kept per chunk (clamped to a tensor's chunk size).
        compression_chunk: chunk edge (≤ 64 per dimension for 8-bit values).
        weight_decay: decoupled, p ← p·(1 − lr·wd).
        sign: apply lr·sign(mean decoded) (True) or lr·(mean decoded).
        process_group: None | commrt Communicator | torch ProcessGroup.
        value_bits: 32 (fp32), 16 (bf16) or 8 (int8 + per-chunk scale) per coefficient.

    Per-step wire bytes per rank: ``(P − 1) · payload_bytes()`` (module docstring), also in
    ``last_step_wire_bytes`` after each step; counted by the transport under ``kind``
    ``"demo.all_gather"``.
    """

    def __init__(self, params: Iterable[Any], lr: float, compression_decay: float = 0.999,
                 compression_topk: int = 32, compression_chunk: int = 64,
                 weight_decay: float = 0.0, sign: bool = True, process_group: Any = None,
                 value_bits: int = 32):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= compression_decay < 1.0:
            raise ValueError(f"compression_decay must be in [0, 1), got {compression_decay}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        if compression_chunk < 1 or compression_topk < 1:
            raise ValueError(f"compression_chunk ({compression_chunk}) and compression_topk "
                             f"({compression_topk}) must be ≥ 1")
        if value_bits not in _VALUE_BYTES:
            raise ValueError(f"value_bits must be 32, 16 or 8, got {value_bits}")
        if value_bits == 8 and compression_chunk > 64:
            raise ValueError(f"8-bit values need 12-bit indices: compression_chunk must be "
                             f"≤ 64, got {compression_chunk}")
        if compression_chunk > 256:
            raise ValueError(f"compression_chunk {compression_chunk} > 256: a 2-D chunk "
                             f"would not fit uint16 chunk-local indices")
        defaults = dict(lr=lr, compression_decay=compression_decay,
                        compression_topk=compression_topk, compression_chunk=compression_chunk,
                        weight_decay=weight_decay, sign=sign)
        super().__init__(params, defaults)
        for group in self.param_groups:
            dims = max((2 if p.dim() >= 2 else 1) for p in group["params"])
            capacity = group["compression_chunk"] ** dims
            if group["compression_topk"] > capacity:
                raise ValueError(
                    f"compression_topk={group['compression_topk']} exceeds the chunk size: a "
                    f"chunk holds at most {capacity} coefficients (compression_chunk="
                    f"{group['compression_chunk']}, {dims}-D chunks)")
        self.comm = T.for_group(process_group)
        self.value_bits = value_bits
        self.kind = "demo.all_gather"
        self.last_step_wire_bytes = 0
        self._codec: CoefficientCodec | None = None
        self._codec_key: tuple | None = None

    # The set of tensors that take part is fixed by which params exist, not which have
    # grads: a param without grad sends zeros so every rank's payload has the same layout.
    def _layouts(self) -> list[tuple[torch.Tensor, dict, ChunkLayout, int]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                layout = ChunkLayout.for_tensor(p.shape, group["compression_chunk"])
                k = min(group["compression_topk"], layout.chunk_elems)
                out.append((p, group, layout, k))
        return out

    def payload_bytes(self) -> int:
        """Bytes one rank contributes to the step's all-gather."""
        return self._get_codec(self._layouts()).payload_bytes

    def _get_codec(self, entries) -> CoefficientCodec:
        key = tuple((l.nchunks, l.chunk_elems, k) for _, _, l, k in entries)
        if self._codec is None or key != self._codec_key:
            self._codec = CoefficientCodec(key, self.value_bits)
            self._codec_key = key
            self.comm.check_uniform([len(key), self._codec.payload_bytes], "DeMo payload layout")
        return self._codec

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._layouts()
        codec = self._get_codec(entries)
        kept = []
        for p, group, layout, k in entries:
            state = self.state[p]
            if "delta" not in state:
                state["delta"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] = 0
            state["step"] += 1
            delta = state["delta"]
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                p.mul_(1.0 - lr * wd)
            delta.mul_(group["compression_decay"])
            if p.grad is not None:
                delta.add_(p.grad.float(), alpha=lr)
            if layout.nchunks == 0:
                kept.append((torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)))
                continue
            coeffs = layout.to_coeffs(delta)
            kept.append(topk_per_chunk(coeffs, k))
        payload, sent_values = codec.encode(kept)
        for (p, group, layout, k), (_, indices), sent in zip(entries, kept, sent_values):
            if layout.nchunks:
                transmitted = _sparse_to_dense(sent.float(), indices, layout.chunk_elems)
                self.state[p]["delta"].sub_(layout.from_coeffs(transmitted))
        gathered = self._all_gather(payload)
        means = codec.decode_mean(gathered, self.comm.size, torch.float32)
        for (p, group, layout, k), mean in zip(entries, means):
            if not layout.nchunks:
                continue
            update = layout.from_coeffs(mean)
            if group["sign"]:
                update = update.sign()
            p.add_(update.to(p.dtype), alpha=-group["lr"])
        self.last_step_wire_bytes = codec.wire_bytes(self.comm.size)
        return loss

    def _all_gather(self, payload: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return payload
        out = torch.empty(self.comm.size * payload.numel(), dtype=torch.uint8)
        self.comm.iallgather(payload, out, kind=self.kind).wait()
        return out

