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

Implementation. Tensors with the same chunk shape and k are batched: one top-k and one
inverse DCT per group rather than per parameter (1-D chunks also share one forward DCT).
Both inverse DCTs start from sparse coefficients (k, resp. ≤ P·k, per chunk) and are
computed from those entries directly (`idct_sparse_chunks`), never from a dense zero-filled
coefficient matrix when the chunk is sparse enough; the results equal the dense formulas
up to float rounding.

All parameters travel in one all-gather per step. Per-rank wire bytes of one step, over a
process group of P ranks (the all-gather's (P−1)/P of the gathered array)::

    (P − 1) · Σ_tensors  nchunks_t · k_t · (2 + value_bytes)  [+ 4 · nchunks_t if 8-bit and k_t < 8]

with k_t = min(compression_topk, chunk elements of t). `DeMo.last_step_wire_bytes` holds
this number for the last step and `DeMo.payload_bytes()` the bracketed per-rank payload.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commrt import kernels as K
from commrt import transports as T

_SCALE_NIBBLES = 8  # an fp32 scale spread over 8 spare index nibbles


# --------------------------------------------------------------------------------------
# DCT chunks (the transforms are commrt.kernels' dct_chunks / idct_chunks)


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
    def for_tensor(cls, shape: Sequence[int], max_chunk: int, one_d: bool = False) -> ChunkLayout:
        return _layout_for(tuple(int(s) for s in shape), int(max_chunk), bool(one_d))

    @classmethod
    def _build(cls, shape: tuple[int, ...], max_chunk: int, one_d: bool) -> ChunkLayout:
        numel = math.prod(shape)
        if one_d or len(shape) < 2:
            return cls(shape, 1, numel, 1, K.dct_chunk_size(numel, max_chunk))
        rows, cols = shape[0], numel // shape[0]
        return cls(shape, rows, cols, K.dct_chunk_size(rows, max_chunk),
                   K.dct_chunk_size(cols, max_chunk))

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
            return K.dct_chunks(x.reshape(-1), self.cc).reshape(-1, self.chunk_elems)
        return K.dct_chunks(x.reshape(self.rows, self.cols), (self.cr, self.cc)).reshape(
            -1, self.chunk_elems)

    def from_coeffs(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_coeffs`, shaped like the tensor."""
        if self.cr == 1 and self.rows == 1:
            return K.idct_chunks(coeffs.reshape(-1, self.cc)).reshape(self.shape)
        grid = coeffs.reshape(self.rows // self.cr, self.cols // self.cc, self.cr, self.cc)
        return K.idct_chunks(grid).reshape(self.shape)

    def grid_view(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of this layout viewed as ``(rows/cr, cr, cols/cc, cc)``: chunk
        (i, j) is ``[i, :, j, :]``."""
        return x.view(self.rows // self.cr, self.cr, self.cols // self.cc, self.cc)

    def chunks_as_grid(self, chunks: torch.Tensor) -> torch.Tensor:
        """A stack of spatial chunks ``(nchunks, cr, cc)`` (in coefficient-row order) as a
        view shaped like `grid_view`, to add into or copy from without a reshuffle first."""
        return chunks.view(self.rows // self.cr, self.cols // self.cc, self.cr,
                           self.cc).transpose(1, 2)

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """A stack of spatial chunks ``(nchunks, cr, cc)`` reassembled into the tensor shape."""
        return self.chunks_as_grid(chunks).reshape(self.shape)


def idct_sparse_chunks(values: torch.Tensor, indices: torch.Tensor, cr: int, cc: int
                       ) -> torch.Tensor:
    """Inverse chunk DCT of sparse coefficient matrices: chunk n holds ``values[n, j]`` at
    chunk-local index ``indices[n, j]`` (row-major in ``cr × cc``; repeated indices add up)
    and zeros elsewhere. Returns the spatial chunks ``(nchunks, cr, cc)`` (1-D chunks: cr 1).

    Same result, up to float rounding, as scattering into a dense ``(nchunks, cr·cc)``
    matrix and inverse-transforming it. With m coefficients per chunk, the 2-D inverse of
    one chunk is ``Br^T S Bc = Σ_j s_j · Br[u_j]^T ⊗ Bc[v_j]`` ((u_j, v_j) = index j's row
    and column) ``= A^T B`` with ``A = (s_j · Br[u_j])_j`` (m × cr) and ``B = (Bc[v_j])_j``
    (m × cc): one batched ``(cr × m) @ (m × cc)`` product, 2·m flops per element, against
    2·(cr + cc) for the dense inverse (which also needs the zero-filled dense matrix). The
    batched product runs below the dense GEMMs' efficiency, so it is used while
    ``2·m ≤ cr + cc`` (DeMo's kept top-k: m = k; the mean of P ranks: m = P·k); denser
    chunks (and 1-D chunks, where m = k is a large share of the chunk) go dense.
    """
    nchunks, m = values.shape
    if cr > 1 and 2 * m <= cr + cc:
        dtype = values.dtype
        rows = torch.index_select(K.dct_basis(cr, dtype, values.device), 0,
                                  (indices // cc).view(-1))
        rows = rows.view(nchunks, m, cr).mul_(values.unsqueeze(2))
        cols = torch.index_select(K.dct_basis(cc, dtype, values.device), 0,
                                  (indices % cc).view(-1))
        return torch.bmm(rows.transpose(1, 2), cols.view(nchunks, m, cc))
    dense = torch.zeros(nchunks, cr * cc, dtype=values.dtype, device=values.device)
    flat = indices + (torch.arange(nchunks, device=indices.device) * (cr * cc)).unsqueeze(1)
    K.scatter_add_(dense.view(-1), flat.reshape(-1), values.reshape(-1))
    if cr == 1:
        return K.idct_chunks(dense).view(nchunks, 1, cc)
    # (nchunks, 1, cr, cc): a column of chunks, whose spatial form is the chunk stack
    return K.idct_chunks(dense.view(nchunks, 1, cr, cc)).view(nchunks, cr, cc)


@functools.cache
def _layout_for(shape: tuple[int, ...], max_chunk: int, one_d: bool) -> ChunkLayout:
    # cached: optimizers ask for every parameter's layout on every step
    return ChunkLayout._build(shape, max_chunk, one_d)


def topk_per_chunk(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by magnitude of every row of (nchunks, e): values and chunk-local int64 indices,
    each (nchunks, k)."""
    nchunks, elems = coeffs.shape
    values, indices = K.topk_blocks(coeffs.reshape(-1), elems, k)
    return values.reshape(nchunks, k), indices.reshape(nchunks, k).long()


# --------------------------------------------------------------------------------------
# Wire codec: chunk-local uint16 indices, fp32 / bf16 / 8-bit values


VALUE_BYTES = {32: 4, 16: 2, 8: 1}


class CoefficientCodec:
    """Packs the kept coefficients of a list of tensors into one uint8 payload per rank and
    turns the all-gathered payloads back into every rank's (value / ranks, index) pairs,
    whose per-chunk sums are the mean coefficient matrices.

    ``specs``: per tensor ``(nchunks, chunk_elems, k)``; every rank must hold the same list.
    """

    def __init__(self, specs: Sequence[tuple[int, int, int]], value_bits: int):
        if value_bits not in VALUE_BYTES:
            raise ValueError(f"value_bits must be 32, 16 or 8, got {value_bits}")
        self.specs = [tuple(int(v) for v in s) for s in specs]
        self.value_bits = value_bits
        for _, elems, _ in self.specs:
            limit = 4096 if value_bits == 8 else 65536
            if elems > limit:
                raise ValueError(f"a DCT chunk of {elems} coefficients does not fit "
                                 f"{'12-bit' if value_bits == 8 else 'uint16'} indices")
        # per tensor: byte sizes of (indices, values, extra scales)
        self.parts = []
        for nchunks, _, k in self.specs:
            n = nchunks * k
            extra = 4 * nchunks if value_bits == 8 and k < _SCALE_NIBBLES else 0
            self.parts.append((2 * n, VALUE_BYTES[value_bits] * n, extra))
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
        for (values, indices), (nchunks, _, k) in zip(kept, self.specs):
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

    def decode(self, gathered: torch.Tensor, ranks: int
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """gathered: (ranks · payload_bytes) uint8, rank-major. Returns per tensor the sent
        coefficients of every rank, divided by ranks, as ``(values, indices)`` float32 and
        int64 chunk-local indices, each ``(nchunks, ranks · k)``: chunk n's mean over ranks
        is the sum of its entries (an index sent by several ranks appears several times)."""
        rows = gathered.view(ranks, self.payload_bytes)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        offset = 0
        for (nchunks, _, k), (ib, vb, eb) in zip(self.specs, self.parts):
            if nchunks == 0:
                out.append((torch.zeros(0, ranks * k), torch.zeros(0, ranks * k,
                                                                   dtype=torch.long)))
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
            if ranks > 1:  # chunk-major: (nchunks, ranks, k) -> (nchunks, ranks·k)
                vals = (vals / ranks).transpose(0, 1)
                idx = idx.transpose(0, 1)
            out.append((vals.reshape(nchunks, ranks * k).float(),
                        idx.reshape(nchunks, ranks * k).long()))
        return out


# --------------------------------------------------------------------------------------
# The optimizer


class WireBytesInStateDict:
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


class DeMo(WireBytesInStateDict, torch.optim.Optimizer):
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
        if value_bits not in VALUE_BYTES:
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
        self._groups: list[tuple[int, int, int, list[tuple[int, int, int]]]] = []
        self._groups_key: tuple | None = None

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

    def _chunk_groups(self, entries) -> list[tuple[int, int, int, list[tuple[int, int, int]]]]:
        """Entries batched by (cr, cc, k): per group ``(cr, cc, k, [(entry, first chunk row,
        nchunks)])``. Every tensor of a group is transformed on its own (its DCT reads its
        own layout), but top-k and the inverse DCTs run once per group on the stacked chunk
        rows: the per-call overhead is paid per chunk shape, not per parameter."""
        key = tuple((l.cr, l.cc, l.nchunks, k) for _, _, l, k in entries)
        if key != self._groups_key:
            groups: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
            rows: dict[tuple[int, int, int], int] = {}
            for i, (_, _, layout, k) in enumerate(entries):
                if layout.nchunks:
                    g = (layout.cr, layout.cc, k)
                    groups.setdefault(g, []).append((i, rows.get(g, 0), layout.nchunks))
                    rows[g] = rows.get(g, 0) + layout.nchunks
            self._groups = [(cr, cc, k, members) for (cr, cc, k), members in groups.items()]
            self._groups_key = key
        return self._groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._layouts()
        codec = self._get_codec(entries)
        groups = self._chunk_groups(entries)
        coeffs: list[torch.Tensor | None] = [None] * len(entries)
        for i, (p, group, layout, _) in enumerate(entries):
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
            if layout.nchunks and layout.cr > 1:
                coeffs[i] = layout.to_coeffs(delta)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)) for _, _, _, k in entries]
        group_indices = []
        for cr, cc, k, members in groups:
            if cr == 1:
                # 1-D chunks (cr = 1) are consecutive runs of cc elements of the flat tensor,
                # so the chunk rows of the concatenated flat momenta are those of each tensor
                # in turn: one DCT for the whole group
                flat = torch.cat([self.state[entries[i][0]]["delta"].view(-1)
                                  for i, _, _ in members])
                stacked = K.dct_chunks(flat, cc).reshape(-1, cc)
            elif len(members) > 1:
                stacked = torch.cat([coeffs[i] for i, _, _ in members])
            else:
                stacked = coeffs[members[0][0]]
            values, indices = topk_per_chunk(stacked, k)
            group_indices.append(indices)
            for i, row, n in members:
                kept[i] = (values[row:row + n], indices[row:row + n])
        payload, sent_values = codec.encode(kept)
        # δ ← δ − IDCT(kept): inverse of the sparse kept coefficients only, per group
        for (cr, cc, _, members), indices in zip(groups, group_indices):
            sent = torch.cat([sent_values[i] for i, _, _ in members]).float() \
                if len(members) > 1 else sent_values[members[0][0]].float()
            chunks = idct_sparse_chunks(sent, indices, cr, cc)
            for i, row, n in members:
                p, _, layout, _ = entries[i]
                layout.grid_view(self.state[p]["delta"]).sub_(
                    layout.chunks_as_grid(chunks[row:row + n]))
        gathered = self._all_gather(payload)
        decoded = codec.decode(gathered, self.comm.size)
        # u = IDCT(mean): the mean's sparse entries (≤ P·k per chunk) inverse-transformed
        for cr, cc, _, members in groups:
            parts = [decoded[i] for i, _, _ in members]
            values = torch.cat([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
            indices = torch.cat([x for _, x in parts]) if len(parts) > 1 else parts[0][1]
            chunks = idct_sparse_chunks(values, indices, cr, cc)
            signed = [entries[i][1]["sign"] for i, _, _ in members]
            if all(signed):  # one sign for the group instead of one per tensor
                chunks = chunks.sign_()
            for i, row, n in members:
                p, group, layout, _ = entries[i]
                update = chunks[row:row + n]
                if group["sign"] and not all(signed):
                    update = update.sign()
                if p.dtype == torch.float32 and p.is_contiguous():
                    # added through the chunk-grid view: no reassembled copy of the update
                    layout.grid_view(p).add_(layout.chunks_as_grid(update), alpha=-group["lr"])
                else:
                    p.add_(layout.from_chunks(update).to(p.dtype), alpha=-group["lr"])
        self.last_step_wire_bytes = codec.wire_bytes(self.comm.size)
        return loss

    def _all_gather(self, payload: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return payload
        out = torch.empty(self.comm.size * payload.numel(), dtype=torch.uint8)
        self.comm.iallgather(payload, out, kind=self.kind).wait()
        return out

