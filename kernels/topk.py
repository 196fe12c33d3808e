"""Top-k selection by magnitude: flat vectors and independent blocks, exact and approximate.

Public functions (dispatching between Triton, the fast CPU implementation and the torch
reference, see ``dispatch``; ``*_triton``, ``*_cpu`` and ``*_torch`` pick one explicitly):

``topk_magnitude(x, k, exact=True) -> (values, indices)``
    The k entries of flat ``x`` with the largest ``|x|``. ``indices`` are int64 and
    ascending, ``values = x[indices]``.
``topk_blocks(x, block_size, k, exact=True) -> (values, indices)``
    The same for every block of ``block_size`` consecutive entries (the last block may be
    shorter); indices are block-local.
``above_threshold(rows, thresholds) -> (values, indices)``
    The entries of each row of 2-D ``rows`` with ``|v| >= thresholds[row]`` (row-major
    flat indices): the fast CPU top-k's candidate pass on its own (fast CPU
    implementation and torch reference only).

Policies (every implementation, pinned by the tests):

* Exact mode returns exactly ``k`` entries; among equal magnitudes the lower index wins, so
  the result is deterministic.
* Approximate mode (``exact=False``), flat: returns every entry with ``|x| >= t`` for a
  threshold ``t`` whose count lands in ``[k, floor((1 + APPROX_EPS) * k)]``; should no
  such threshold exist (many ties), it returns exactly ``k`` (ties to the lower index).
  Every returned entry is at least as large as every entry left out. Which threshold is
  an implementation's choice: the Triton path and the torch reference agree with each
  other, the fast CPU path usually returns the exact selection.
* Approximate mode, blocks: exactly ``min(k, len(block))`` entries per block, each of them
  among the ``floor((1 + APPROX_EPS) * k)`` largest of its block: every entry above a
  threshold ``hi`` plus the lowest-index entries of the band ``[lo, hi)`` (the fast CPU
  path: the exact selection).
* NaN or Inf anywhere in the input raises ``ValueError`` (a gradient with them should not
  be compressed silently). ``k < 0``, ``k > n`` or a non-float dtype raise ``ValueError``.

The algorithm of the Triton path (one search it shares with the approximate torch
reference, only the passes over memory differ): a strided sample of the magnitudes gives candidate thresholds around the expected
rank of the k-th largest; one counting pass counts, per chunk of the row and per
candidate, the entries ``>=`` each candidate; the bracket ``[lo, hi)`` (count(lo) >= k >
count(hi)) shrinks. Further rounds split the bracket evenly in the thresholds' bit pattern
(monotonic for non-negative floats), so the search ends after a bounded number of rounds:
when count(lo) is within the tolerance, or when no float lies between lo and hi (then the
entries equal to lo are ties, taken in index order). One compaction pass writes the
selected indices and values in index order, from per-chunk counts and an in-chunk prefix
sum. Exact mode is the same search with tolerance zero. The torch reference of exact mode
is an independent, simpler computation (``torch.topk`` for the k-th magnitude, then a
tie-ranked mask); the reference of approximate mode runs the search with torch passes.
The fast CPU implementation is a third algorithm (a sampled threshold, one candidate pass,
the exact k-th among the candidates), described above its code.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import (
    backend,
    check_finite,
    check_float,
    check_k,
    cpu_map,
    lazy_jit,
    require_cpu,
    require_triton,
    tl,
)

APPROX_EPS = 0.05
"""Approximate top-k returns between k and floor((1 + APPROX_EPS) * k) entries."""

NUM_CANDIDATES = 32   # thresholds counted per pass (power of two for tl.arange)
SAMPLE_SIZE = 4096    # strided sample per row for the first round's candidates ...
SAMPLE_BUDGET = 1 << 20  # ... and over all rows together (many small blocks: fewer each)
COUNT_CHUNK = 1024    # elements per Triton program in the counting and compaction passes

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float32: torch.int32, torch.float64: torch.int64}


def approx_cap(k: int) -> int:
    """The largest count approximate top-k may return for a budget of ``k``."""
    return int(math.floor((1.0 + APPROX_EPS) * k))


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
if tl is not None:

    @lazy_jit
    def _count_kernel(x_ptr, y_ptr, thr_ptr, counts_ptr, bad_ptr, n, row_len, num_chunks,
                      HAS_Y: tl.constexpr, CHUNK: tl.constexpr, NUM_THR: tl.constexpr):
        """counts[row, chunk, j] = #{i in chunk : |v_i| >= thr[row, j]}, v = x (+ y)."""
        pid = tl.program_id(0)   # 1-D grid: CUDA caps the y dimension at 65535
        row = pid // num_chunks
        chunk = pid % num_chunks
        local = chunk * CHUNK + tl.arange(0, CHUNK)
        offs = row.to(tl.int64) * row_len + local
        mask = (local < row_len) & (offs < n)
        if HAS_Y:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0)
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(y.dtype) + y
        else:
            v = tl.load(x_ptr + offs, mask=mask, other=0.0)
        a = tl.abs(v)
        thr = tl.load(thr_ptr + row * NUM_THR + tl.arange(0, NUM_THR))
        hits = (a[:, None] >= thr[None, :]) & mask[:, None]
        cnt = tl.sum(hits.to(tl.int32), axis=0)
        out = (row * num_chunks + chunk).to(tl.int64)
        tl.store(counts_ptr + out * NUM_THR + tl.arange(0, NUM_THR), cnt)
        # NaN fails every comparison, Inf passes: flag both for the caller's ValueError.
        bad = mask & ((a != a) | (a == float("inf")))
        tl.store(bad_ptr + out, tl.sum(bad.to(tl.int32), axis=0))

    @lazy_jit
    def _compact_kernel(x_ptr, y_ptr, strong_ptr, weak_ptr, quota_ptr, base_ptr, wbase_ptr,
                        out_val_ptr, out_idx_ptr, n, row_len, num_chunks,
                        HAS_Y: tl.constexpr, CHUNK: tl.constexpr):
        """Write the selected entries of one chunk at their place in index order.

        Selected: |v| >= strong[row], plus the entries with weak[row] <= |v| < strong[row]
        whose rank among those in the row is below quota[row]. base/wbase: selected-strong
        output position and weak-band count before this chunk. With y (error feedback):
        y <- v with the selected entries zeroed.
        """
        pid = tl.program_id(0)   # 1-D grid: CUDA caps the y dimension at 65535
        row = pid // num_chunks
        chunk = pid % num_chunks
        local = chunk * CHUNK + tl.arange(0, CHUNK)
        offs = row.to(tl.int64) * row_len + local
        mask = (local < row_len) & (offs < n)
        if HAS_Y:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0)
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(y.dtype) + y
        else:
            v = tl.load(x_ptr + offs, mask=mask, other=0.0)
        a = tl.abs(v)
        t_strong = tl.load(strong_ptr + row)
        t_weak = tl.load(weak_ptr + row)
        quota = tl.load(quota_ptr + row)
        cid = (row * num_chunks + chunk).to(tl.int64)
        base = tl.load(base_ptr + cid)
        wbase = tl.load(wbase_ptr + cid)
        strong = mask & (a >= t_strong)
        weak = mask & (a >= t_weak) & (a < t_strong)
        s_i = strong.to(tl.int64)
        w_i = weak.to(tl.int64)
        s_before = tl.cumsum(s_i, axis=0) - s_i
        w_before = wbase + tl.cumsum(w_i, axis=0) - w_i
        sel = strong | (weak & (w_before < quota))
        pos = base + s_before + tl.minimum(w_before, quota)
        tl.store(out_idx_ptr + pos, local.to(tl.int64), mask=sel)
        tl.store(out_val_ptr + pos, v, mask=sel)
        if HAS_Y:
            tl.store(y_ptr + offs, tl.where(sel, 0.0, v).to(y.dtype), mask=mask)


# ----------------------------------------------------------------------------------------
# The threshold search, shared by the Triton path and the approximate torch reference
# ----------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """A flat vector viewed as rows of ``row_len`` (the last one may be shorter)."""
    n: int
    row_len: int
    num_rows: int
    lengths: torch.Tensor   # int64 [R]
    budgets: torch.Tensor   # int64 [R] = min(k, length)

    @staticmethod
    def make(n: int, row_len: int, k: int, device: torch.device) -> _Rows:
        row_len = min(row_len, n)   # one block longer than x: a single row of n
        num_rows = -(-n // row_len)
        lengths = torch.full((num_rows,), row_len, dtype=torch.int64, device=device)
        lengths[-1] = n - (num_rows - 1) * row_len
        return _Rows(n, row_len, num_rows, lengths, lengths.clamp(max=k))


def _to_bits(v: torch.Tensor) -> torch.Tensor:
    return v.view(_INT_VIEW[v.dtype]).to(torch.int64)


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.to(_INT_VIEW[dtype]).view(dtype)


def _magnitudes(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return (x.to(y.dtype) + y).abs() if y is not None else x.abs()


def _column(counts: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """counts[r, :, which[r]] for every row r, as int64 [R, C]."""
    idx = which[:, None, None].expand(-1, counts.shape[1], 1)
    return counts.gather(2, idx).squeeze(2).to(torch.int64)


CountFn = Callable[[torch.Tensor, bool], torch.Tensor]


def _search(x: torch.Tensor, y: torch.Tensor | None, rows: _Rows, exact: bool,
            fixed_count: bool, count: CountFn, num_chunks: int, chunk: int):
    """Find, per row, the thresholds and tie quota of the selection.

    ``count(thresholds [R, B] in the value dtype, first_round) -> [R, num_chunks, B]``
    counts entries >= each threshold per chunk. Returns (strong, weak, quota,
    strong_counts [R, C], weak_counts [R, C]) describing the selection: every entry with
    |v| >= strong plus the first ``quota`` (in index order) with weak <= |v| < strong.
    """
    dtype = y.dtype if y is not None else x.dtype
    dev = x.device
    R, B = rows.num_rows, NUM_CANDIDATES
    budgets = rows.budgets
    cap = budgets if exact else torch.floor(budgets.double() * (1.0 + APPROX_EPS)).long()
    inf_bits = int(_to_bits(torch.tensor([float("inf")], dtype=dtype)).item())

    # Per-chunk element counts: the count of |v| >= 0 (lo's initial bracket end).
    chunk_start = torch.arange(num_chunks, device=dev, dtype=torch.int64) * chunk
    chunk_len = (rows.lengths[:, None] - chunk_start[None, :]).clamp(0, chunk)
    lo = torch.zeros(R, dtype=torch.int64, device=dev)
    hi = torch.full((R,), inf_bits, dtype=torch.int64, device=dev)
    c_lo = chunk_len.clone()
    c_hi = torch.zeros_like(c_lo)

    # First round: candidates from a strided sample, spread around the expected rank.
    s = min(rows.row_len, SAMPLE_SIZE, max(16, SAMPLE_BUDGET // R))
    in_row = (torch.arange(s, device=dev, dtype=torch.int64) * rows.row_len) // s
    pos = torch.arange(R, device=dev, dtype=torch.int64)[:, None] * rows.row_len + in_row
    valid = in_row[None, :] < rows.lengths[:, None]
    sample = _magnitudes(x[pos.clamp(max=rows.n - 1)],
                         None if y is None else y[pos.clamp(max=rows.n - 1)])
    sample = torch.where(valid, sample, torch.full_like(sample, -1.0))
    sample = sample.sort(dim=1, descending=True).values
    s_r = valid.sum(1).double()
    q = budgets.double() * s_r / rows.lengths.double()
    sd = torch.sqrt(q * (1.0 - budgets.double() / rows.lengths.double())) + 1.0
    z = torch.linspace(-3.0, 3.0, B, device=dev, dtype=torch.float64)
    p = torch.round(q[:, None] - 1.0 + sd[:, None] * z[None, :])
    p = torch.minimum(p.clamp(min=0.0), (s_r - 1.0)[:, None]).long()
    cand = _to_bits(sample.gather(1, p).clamp(min=0.0))

    first = True
    done = (c_lo.sum(1) <= cap) | (budgets == 0)
    while True:
        cand = torch.where((cand > lo[:, None]) & (cand < hi[:, None]), cand,
                           torch.full_like(cand, inf_bits))
        counts = count(_from_bits(cand, dtype), first)   # [R, C, B]
        first = False
        totals = counts.sum(1)                           # [R, B]
        real = cand < inf_bits
        ge = real & (totals >= budgets[:, None])
        lo_cand = torch.where(ge, cand, torch.full_like(cand, -1)).max(1)
        take = (lo_cand.values > lo) & ~done
        lo = torch.where(take, lo_cand.values, lo)
        c_lo = torch.where(take[:, None], _column(counts, lo_cand.indices), c_lo)
        hi_cand = torch.where(real & ~ge, cand, torch.full_like(cand, inf_bits)).min(1)
        take = (hi_cand.values < hi) & ~done
        hi = torch.where(take, hi_cand.values, hi)
        c_hi = torch.where(take[:, None], _column(counts, hi_cand.indices), c_hi)
        done = done | (c_lo.sum(1) <= cap) | (hi - lo <= 1)
        if bool(done.all()):
            break
        # Next round: split (lo, hi) evenly in bit space; strictly inside, so it shrinks.
        j = torch.arange(1, B + 1, device=dev, dtype=torch.int64)
        cand = lo[:, None] + ((hi - lo)[:, None] * j[None, :]) // (B + 1)

    n_lo = c_lo.sum(1)
    # Flat approximate mode keeps everything >= lo when it fits the tolerance; otherwise
    # (ties, exact mode, fixed-count blocks) everything >= hi plus the first of [lo, hi).
    whole = (n_lo <= cap) if not fixed_count else (n_lo == budgets)
    whole = whole | (budgets == 0)
    lo_v, hi_v = _from_bits(lo, dtype), _from_bits(hi, dtype)
    strong = torch.where(whole, lo_v, hi_v)
    weak = lo_v
    quota = torch.where(whole, torch.zeros_like(budgets), budgets - c_hi.sum(1))
    strong_counts = torch.where(whole[:, None], c_lo, c_hi)
    weak_counts = torch.where(whole[:, None], torch.zeros_like(c_lo), c_lo - c_hi)
    zero_rows = budgets == 0
    if bool(zero_rows.any()):
        strong = torch.where(zero_rows, torch.full_like(strong, float("inf")), strong)
        strong_counts = torch.where(zero_rows[:, None], torch.zeros_like(c_lo), strong_counts)
    return strong, weak, quota, strong_counts, weak_counts


# ----------------------------------------------------------------------------------------
# The two implementations of the passes
# ----------------------------------------------------------------------------------------
def _select_triton(x: torch.Tensor, y: torch.Tensor | None, rows: _Rows, exact: bool,
                   fixed_count: bool):
    require_triton(x)
    chunk = min(COUNT_CHUNK, max(16, 1 << (rows.row_len - 1).bit_length()))
    num_chunks = -(-rows.row_len // chunk)
    R, B = rows.num_rows, NUM_CANDIDATES
    dev = x.device
    has_y = y is not None
    y_arg = y if has_y else x
    counts = torch.empty((R, num_chunks, B), dtype=torch.int32, device=dev)
    bad = torch.empty((R, num_chunks), dtype=torch.int32, device=dev)

    def count(thresholds: torch.Tensor, first: bool) -> torch.Tensor:
        _count_kernel[(R * num_chunks,)](x, y_arg, thresholds.contiguous(), counts, bad, rows.n,
                                       rows.row_len, num_chunks, HAS_Y=has_y, CHUNK=chunk,
                                       NUM_THR=B, num_warps=8)
        if first and bool(bad.any()):
            raise ValueError(("grad + residual" if has_y else "x") + " contains NaN or Inf")
        return counts

    strong, weak, quota, s_cnt, w_cnt = _search(x, y, rows, exact, fixed_count, count,
                                                num_chunks, chunk)
    taken = s_cnt.sum(1) + torch.minimum(w_cnt.sum(1), quota)
    row_start = torch.cumsum(taken, 0) - taken
    base = (row_start[:, None] + torch.cumsum(s_cnt, 1) - s_cnt).contiguous()
    wbase = (torch.cumsum(w_cnt, 1) - w_cnt).contiguous()
    total = int(taken.sum().item())
    out_dtype = y.dtype if has_y else x.dtype
    values = torch.empty(total, dtype=out_dtype, device=dev)
    indices = torch.empty(total, dtype=torch.int64, device=dev)
    _compact_kernel[(R * num_chunks,)](x, y_arg, strong.contiguous(), weak.contiguous(),
                                     quota.contiguous(), base, wbase, values, indices, rows.n,
                                     rows.row_len, num_chunks, HAS_Y=has_y, CHUNK=chunk,
                                     num_warps=8)
    return values, indices, taken


def _padded_magnitudes(v: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """|v| as [R, row_len] with -1 in the padding after the last row's end."""
    a = torch.full((rows.num_rows * rows.row_len,), -1.0, dtype=v.dtype, device=v.device)
    a[: rows.n] = v.abs()
    return a.view(rows.num_rows, rows.row_len)


def _select_torch_search(x: torch.Tensor, y: torch.Tensor | None, rows: _Rows,
                         exact: bool, fixed_count: bool):
    """The approximate reference: the same search, with torch passes (one chunk per row)."""
    v = x.to(y.dtype) + y if y is not None else x
    a = _padded_magnitudes(v, rows)
    R, B = rows.num_rows, NUM_CANDIDATES

    def count(thresholds: torch.Tensor, first: bool) -> torch.Tensor:
        # #{a >= t_j} for all j at once: bucket = #{t <= a} over the sorted thresholds.
        t_sorted, order = thresholds.sort(dim=1)
        bucket = torch.searchsorted(t_sorted, a, right=True)
        hist = torch.zeros((R, B + 1), dtype=torch.int64, device=a.device)
        hist.scatter_add_(1, bucket, torch.ones_like(bucket))
        at_least = hist.flip(1).cumsum(1).flip(1)[:, 1:]       # [R, B]: #{bucket > j}
        counts = torch.empty_like(at_least)
        counts.scatter_(1, order, at_least)
        return counts[:, None, :]

    strong, weak, quota, _, _ = _search(x, y, rows, exact, fixed_count, count, 1,
                                        rows.row_len)
    return _compact_thresholds(v, a, strong, weak, quota, rows)


def _compact_torch(v: torch.Tensor, strong_m: torch.Tensor, weak_m: torch.Tensor,
                   quota: torch.Tensor, rows: _Rows):
    """Select strong entries plus the first ``quota`` weak ones of each row, in index order."""
    weak_rank = weak_m.long().cumsum(1) - weak_m.long()
    sel = strong_m | (weak_m & (weak_rank < quota[:, None]))
    r, local = sel.nonzero(as_tuple=True)
    values = v[r * rows.row_len + local]
    return values, local, sel.sum(1)


def _compact_thresholds(v: torch.Tensor, a: torch.Tensor, strong: torch.Tensor,
                        weak: torch.Tensor, quota: torch.Tensor, rows: _Rows):
    strong_m = a >= strong[:, None]
    weak_m = (a >= weak[:, None]) & ~strong_m
    return _compact_torch(v, strong_m, weak_m, quota, rows)


def _select_torch_exact(v: torch.Tensor, rows: _Rows):
    """The exact reference: the k-th magnitude from torch.topk, ties ranked by index."""
    a = _padded_magnitudes(v, rows)
    k = int(rows.budgets.max().item())
    if k == 0:
        empty = torch.zeros(rows.num_rows, dtype=torch.int64, device=v.device)
        return v[:0], empty[:0], empty
    kth = torch.topk(a, k, dim=1, sorted=True).values              # [R, k]
    thr = kth.gather(1, (rows.budgets - 1).clamp(min=0)[:, None]).squeeze(1)
    thr = torch.where(rows.budgets > 0, thr, torch.full_like(thr, float("inf")))
    strong_m = a > thr[:, None]
    weak_m = a == thr[:, None]
    return _compact_torch(v, strong_m, weak_m, rows.budgets - strong_m.sum(1), rows)


# ----------------------------------------------------------------------------------------
# The fast CPU implementation
# ----------------------------------------------------------------------------------------
# A different algorithm from the Triton path's search, with the same results (exact mode:
# the same indices; approximate flat mode: a threshold set within the tolerance, or the
# exact set). Magnitudes are compared as integers: for non-negative floats the bit pattern
# is monotonic, ``bits & 0x7f..f`` is |v|, and NaN/Inf have the largest patterns, so they
# pass every candidate threshold and the NaN/Inf check costs no pass of its own. The
# passes use numpy on zero-copy views because torch's CPU ``nonzero`` and boolean
# compares are about ten times slower than numpy's on one thread (measured).
#
# 1. Sample (per row) magnitudes in short runs at jittered strided offsets; the threshold
#    ``lo`` = the r-th largest of the sample, r = q + CPU_SAMPLE_Z * sqrt(q) + 2 for the
#    sample's expected count q = k * s / L above the true k-th: count(|v| >= lo) >= k
#    except with probability ~3e-5 for entries in random order (a miss costs time only:
#    the row is redone directly, step 4).
# 2. One chunked pass: ``bits & mask >= lo`` and ``flatnonzero`` give the candidates'
#    positions and bits (~1.2 k of them for a flat 16M vector at 1 %).
# 3. The exact k-th magnitude of each row among its candidates (``np.partition``), then
#    everything above it plus the lowest-index ties: the reference's selection. Flat
#    approximate mode keeps all candidates when their count is within the tolerance and
#    otherwise everything >= the k-th when that fits the tolerance.
# 4. Rows too short to sample (block_size < 16 * CPU_SAMPLE_MIN), and rows whose sample
#    threshold missed, take the k-th magnitude directly (``np.partition`` of the row).
CPU_CHUNK = 1 << 18          # elements per chunk of a pass (a few MiB: stays in cache)
CPU_SAMPLE_TOTAL = 1 << 19   # sampled magnitudes over all rows together ...
CPU_SAMPLE_MAX = 1 << 16     # ... at most this many per row ...
CPU_SAMPLE_MIN = 64          # ... and at least this many (else rows are done directly)
CPU_SAMPLE_RUN = 16          # sampled in runs of consecutive entries (one cache line)
CPU_SAMPLE_Z = 4.0           # safety margin of the sample threshold, in standard deviations
CPU_ROW_LOOP = 1024          # up to this many rows, each row's k-th is found on its own

_NP_INT = {torch.float16: np.int16, torch.bfloat16: np.int16, torch.float32: np.int32,
           torch.float64: np.int64}


class _CpuSource:
    """The entries ``v = x`` (or ``x.to(y.dtype) + y``) of flat CPU tensors as raw bits."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None,
                 name: str | None = None) -> None:
        # `name`: the input's name in the NaN/Inf error (default "x" or "grad + residual").
        self.name = name or ("grad + residual" if y is not None else "x")
        # Detached: the numpy views below refuse tensors that require grad.
        self.x, self.y = x.detach(), (y.detach() if y is not None else None)
        self.dtype = y.dtype if y is not None else x.dtype
        self.itype = _INT_VIEW[self.dtype]
        nptype = _NP_INT[self.dtype]
        self.mask = nptype(np.iinfo(nptype).max)       # clears the sign bit
        self.inf_bits = nptype(_to_bits(torch.tensor([float("inf")], dtype=self.dtype)).item())
        self.local = threading.local()

    def bits(self, start: int, end: int) -> np.ndarray:
        """Bits of v[start:end]; with y, a per-thread buffer valid until the next call."""
        if self.y is None:
            return self.x[start:end].view(self.itype).numpy()
        m = end - start
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < m:
            buf = torch.empty(max(m, CPU_CHUNK), dtype=self.dtype)
            if m <= CPU_CHUNK:
                self.local.buf = buf
        out = buf[:m]
        g, r = self.x[start:end], self.y[start:end]
        if g.dtype == r.dtype:
            torch.add(g, r, out=out)
        else:   # as the reference: round grad to the residual's dtype first
            out.copy_(g)
            out.add_(r)
        return out.view(self.itype).numpy()

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """Bits of v at the positions ``pos`` (a fresh array)."""
        x = self.x.view(_INT_VIEW[self.x.dtype]).numpy()[pos]
        if self.y is None:
            return x
        y = torch.from_numpy(self.y.view(self.itype).numpy()[pos]).view(self.dtype)
        v = torch.from_numpy(x).view(self.x.dtype).to(self.dtype) + y
        return v.view(self.itype).numpy()

    def magnitudes(self, bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.bitwise_and(bits, self.mask, out=out)

    def scratch(self, name: str, size: int, dtype) -> np.ndarray:
        """A per-thread work array of ``size`` elements, reused across chunks (a fresh
        allocation per chunk costs page faults comparable to the pass itself)."""
        buf = getattr(self.local, name, None)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(max(size, CPU_CHUNK), dtype=dtype)
            if size > CPU_CHUNK:
                return buf   # an outsized one-off (a long row done directly): not kept
            setattr(self.local, name, buf)
        return buf[:size]

    def check(self, mags: np.ndarray) -> None:
        if mags.size and mags.max() >= self.inf_bits:
            raise ValueError(f"{self.name} contains NaN or Inf")


def _cpu_segments(base: int, rows: np.ndarray, row_len: int,
                  split_rows: bool = True) -> list[tuple[int, int, int, int]]:
    """Chunks ``(start, end, r0, r1)`` covering ``rows``: pieces of one row (long rows, if
    ``split_rows``) or runs of whole rows."""
    L = row_len
    if L >= CPU_CHUNK and not split_rows:
        return [(base + int(r) * L, base + (int(r) + 1) * L, int(r), int(r) + 1) for r in rows]
    if L >= CPU_CHUNK:
        return [(base + int(r) * L + c, base + int(r) * L + min(L, c + CPU_CHUNK), int(r),
                 int(r) + 1) for r in rows for c in range(0, L, CPU_CHUNK)]
    per = max(1, CPU_CHUNK // L)
    rows = np.asarray(rows, dtype=np.int64)
    # Runs of consecutive rows, cut into pieces of at most `per` rows.
    run_start = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    run_end = np.append(run_start[1:], rows.size)
    segs = []
    for a, b in zip(run_start.tolist(), run_end.tolist()):
        for i in range(a, b, per):
            r0, r1 = int(rows[i]), int(rows[min(i + per, b) - 1]) + 1
            segs.append((base + r0 * L, base + r1 * L, r0, r1))
    return segs


def _cpu_candidates(src: _CpuSource, segs, row_len: int, thr: np.ndarray):
    """Positions and bits of the entries with magnitude >= thr[row], over all segments."""
    def one(seg):
        start, end, r0, r1 = seg
        bits = src.bits(start, end)
        m = src.magnitudes(bits, out=src.scratch("mags", bits.size, bits.dtype))
        h = src.scratch("hit", bits.size, np.bool_)
        if r1 - r0 == 1:
            np.greater_equal(m, thr[r0], out=h)
        else:
            np.greater_equal(m.reshape(r1 - r0, row_len), thr[r0:r1, None],
                             out=h.reshape(r1 - r0, row_len))
        idx = np.flatnonzero(h)
        return idx + start, bits[idx]

    parts = cpu_map(one, segs)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, _NP_INT[src.dtype])
    return (np.concatenate([p for p, _ in parts]), np.concatenate([b for _, b in parts]))


def _cpu_direct(src: _CpuSource, segs, row_len: int, k: int):
    """Per segment of whole rows: the k-th magnitude of each row, and the entries >= it."""
    def one(seg):
        start, end, r0, r1 = seg
        bits = src.bits(start, end)
        work = src.scratch("mags", bits.size, bits.dtype)
        mags = src.magnitudes(bits, out=work).reshape(r1 - r0, row_len)
        mags.partition(row_len - k, axis=1)      # in place: then the magnitudes again
        src.check(mags[:, row_len - k:])         # each row's maximum is in its top k
        kth = mags[:, row_len - k].copy()
        mags = src.magnitudes(bits, out=work).reshape(r1 - r0, row_len)
        hit = src.scratch("hit", bits.size, np.bool_).reshape(r1 - r0, row_len)
        np.greater_equal(mags, kth[:, None], out=hit)
        idx = np.flatnonzero(hit)
        # Every row has >= k hits, so k per row unless the total says there are ties.
        counts = (np.full(r1 - r0, k) if idx.size == (r1 - r0) * k
                  else np.count_nonzero(hit, axis=1))
        return idx + start, bits[idx], kth, counts

    parts = cpu_map(one, segs)
    return tuple(np.concatenate(column) for column in zip(*parts))


def _cpu_sample(src: _CpuSource, base: int, num_rows: int, row_len: int, s: int) -> np.ndarray:
    """Magnitudes ``[R, s]`` of each row at runs of CPU_SAMPLE_RUN consecutive entries,
    the runs at jittered strided offsets (runs: a cache line per run, not per entry)."""
    run = min(CPU_SAMPLE_RUN, s)
    runs = s // run
    stride = row_len // runs
    i = np.arange(runs, dtype=np.int64)
    starts = i * stride + (i * 2654435761) % max(1, stride - run + 1)
    offs = (starts[:, None] + np.arange(run)[None, :]).reshape(-1)
    rows = base + np.arange(num_rows, dtype=np.int64)[:, None] * row_len
    return src.magnitudes(src.gather((rows + offs[None, :]).reshape(-1))).reshape(num_rows, -1)


def _cpu_rows(src: _CpuSource, base: int, num_rows: int, row_len: int, k: int,
              approx_flat: bool):
    """Select ``k`` (``1 <= k <= row_len``) entries of each of ``num_rows`` rows starting
    at ``base``: (row-local positions, bits, per-row counts), ascending within a row."""
    R, L = num_rows, row_len
    all_rows = np.arange(R)
    row_bounds = base + np.arange(R + 1, dtype=np.int64) * L
    s = min(max(CPU_SAMPLE_TOTAL // R, CPU_SAMPLE_MIN), CPU_SAMPLE_MAX, L // 16)
    kth = None
    if s >= CPU_SAMPLE_MIN:
        sample = _cpu_sample(src, base, R, L, s)
        src.check(sample)
        s = sample.shape[1]
        q = k * s / L
        r = max(1, math.ceil(q + CPU_SAMPLE_Z * math.sqrt(q) + 2))
        if r >= s:
            thr = np.zeros(R, dtype=sample.dtype)
        else:
            thr = np.ascontiguousarray(np.partition(sample, s - r, axis=1)[:, s - r])
        pos, bits = _cpu_candidates(src, _cpu_segments(base, all_rows, L), L, thr)
        mags = src.magnitudes(bits)
        src.check(mags)
        starts = np.searchsorted(pos, row_bounds)
        missed = np.flatnonzero(np.diff(starts) < k)
        if missed.size:   # rare: those rows again, directly, merged in position order
            keep = np.repeat(np.diff(starts) >= k, np.diff(starts))
            p2, b2, _, _ = _cpu_direct(src, _cpu_segments(base, missed, L, False), L, k)
            pos = np.concatenate([pos[keep], p2])
            bits = np.concatenate([bits[keep], b2])
            order = np.argsort(pos, kind="stable")
            pos, bits = pos[order], bits[order]
            mags = src.magnitudes(bits)
            starts = np.searchsorted(pos, row_bounds)
    else:
        pos, bits, kth, counts = _cpu_direct(src, _cpu_segments(base, all_rows, L, False), L, k)
        if R > 1 and np.all(counts == k):   # no surplus ties: the candidates are the result
            row_of = np.repeat(all_rows, k)
            return pos - base - row_of * L, bits, counts
        mags = src.magnitudes(bits)
        starts = np.concatenate([[0], np.cumsum(counts)])
    if R == 1:
        return _cpu_finish_flat(pos - base, bits, mags, k, None if kth is None else kth[0],
                                approx_flat)
    return _cpu_finish_rows(pos, bits, mags, starts, base, L, k, kth)


def _cpu_finish_flat(pos, bits, mags, k: int, kth, approx_flat: bool):
    """One row: everything above the k-th magnitude plus the lowest-index ties (flat
    approximate mode: a whole threshold set when its count fits the tolerance)."""
    c, cap = pos.size, approx_cap(k)
    if approx_flat and kth is None and c <= cap:
        return pos, bits, np.array([c])   # the candidate threshold itself fits
    if kth is None:
        kth = np.partition(mags, c - k)[c - k]
    ge = mags >= kth
    n_ge = int(np.count_nonzero(ge))
    if n_ge == k or (approx_flat and n_ge <= cap):
        sel = ge
    else:   # surplus ties at the k-th magnitude: the lowest positions win
        gt = mags > kth
        quota = k - int(np.count_nonzero(gt))
        eq = ge & ~gt
        sel = gt | (eq & (np.cumsum(eq) <= quota))
    out = np.flatnonzero(sel)
    return pos[out], bits[out], np.array([out.size])


def _cpu_finish_rows(pos, bits, mags, starts, base: int, L: int, k: int, kth):
    """Many rows (``starts``: each row's first candidate): the same, row by row."""
    R = starts.size - 1
    counts = np.diff(starts)
    row_of = np.repeat(np.arange(R), counts)
    if kth is None:   # the k-th magnitude of each row among its candidates
        if R <= CPU_ROW_LOOP:   # few rows: one partition per row beats padding them
            kth = np.array([np.partition(mags[a:b], b - a - k)[b - a - k]
                            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())],
                           dtype=mags.dtype)
        else:             # many short rows: one partition of the rows padded with -1
            width = int(counts.max())
            padded = np.full(R * width, -1, dtype=mags.dtype)
            padded[row_of * width + (np.arange(pos.size) - starts[row_of])] = mags
            padded = padded.reshape(R, width)
            padded.partition(width - k, axis=1)
            kth = padded[:, width - k]
    kth_c = kth[row_of]
    ge = mags >= kth_c
    if np.count_nonzero(ge) == k * R:   # no surplus ties in any row
        sel = ge
    else:   # surplus ties at a row's k-th magnitude: the lowest positions of the row win
        gt = mags > kth_c
        quota = k - np.bincount(row_of[gt], minlength=R)
        eq = ge & ~gt
        cum = np.cumsum(eq)
        before = np.concatenate([[0], cum])[starts[:-1]]
        sel = gt | (eq & (cum - before[row_of] <= quota[row_of]))
    out = np.flatnonzero(sel)
    return pos[out] - base - row_of[out] * L, bits[out], np.full(R, k, dtype=np.int64)


def _select_cpu(x: torch.Tensor, y: torch.Tensor | None, row_len: int, k: int,
                exact: bool, fixed_count: bool):
    require_cpu(*(t for t in (x, y) if t is not None))
    src = _CpuSource(x, y)
    n = x.numel()
    L = min(row_len, n)
    full, tail = divmod(n, L)
    pieces = []   # (row-local positions, bits, counts) of the full rows, then the tail
    for base, R, length in ((0, full, L), (full * L, 1, tail)):
        if R == 0 or length == 0:
            continue
        kr = min(k, length)
        if kr == 0:   # nothing to select; NaN/Inf still raise (a pass with threshold Inf)
            thr = np.full(R, src.inf_bits)
            _, bad = _cpu_candidates(src, _cpu_segments(base, np.arange(R), length), length, thr)
            src.check(src.magnitudes(bad))
            pieces.append((np.zeros(0, np.int64), np.zeros(0, _NP_INT[src.dtype]),
                           np.zeros(R, np.int64)))
            continue
        pieces.append(_cpu_rows(src, base, R, length, kr,
                                approx_flat=not exact and not fixed_count))
    positions, bits, counts = (np.concatenate(parts) if len(parts) > 1 else parts[0]
                               for parts in zip(*pieces))
    values = torch.from_numpy(bits).view(src.dtype)
    return values, torch.from_numpy(positions), torch.from_numpy(counts)


def run_select(x: torch.Tensor, y: torch.Tensor | None, row_len: int, k: int,
               exact: bool, fixed_count: bool, impl: str):
    """The selection behind every public function of this module and ``error_feedback``.

    Selects, in each row of ``row_len`` consecutive entries of ``v = x`` (or, with ``y``,
    ``x.to(y.dtype) + y``; the last row may be shorter), ``min(k, len(row))`` entries by
    magnitude: exact with ties to the lower index when ``exact`` or ``fixed_count``, else
    the flat approximate policy of the module docstring. ``x`` (and ``y``) are flat and
    contiguous, ``k`` already checked. ``impl`` is a :data:`dispatch.BACKENDS` name.
    Returns ``(values, row-local indices, per-row counts)``. The Triton path also writes
    ``y <- v`` with the selected entries zeroed (fused error feedback); the others leave
    x and y untouched.
    """
    if impl == "triton":
        return _select_triton(x, y, _Rows.make(x.numel(), row_len, k, x.device), exact,
                              fixed_count)
    if impl == "cpu":
        return _select_cpu(x, y, row_len, k, exact, fixed_count)
    rows = _Rows.make(x.numel(), row_len, k, x.device)
    v = x.to(y.dtype) + y if y is not None else x
    check_finite(v, "grad + residual" if y is not None else "x")
    if exact:
        return _select_torch_exact(v, rows)
    return _select_torch_search(x, y, rows, exact, fixed_count)


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    check_float(x, name)
    return x.reshape(-1).contiguous()


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def _magnitude(x: torch.Tensor, k: int, exact: bool, impl: str | None):
    flat = _flat(x, "x")
    k = check_k(k, flat.numel())
    if flat.numel() == 0:
        return flat[:0], torch.zeros(0, dtype=torch.int64, device=flat.device)
    if impl is None:
        impl = backend(flat)
    values, indices, _ = run_select(flat, None, flat.numel(), k, exact, False, impl)
    return values, indices


def topk_magnitude(x: torch.Tensor, k: int, exact: bool = True):
    """Top-k of flat ``x`` by magnitude: ``(values, indices)``, indices int64 ascending.

    ``values = x[indices]`` (same dtype as x). Exact mode: exactly k entries, ties to the
    lower index. Approximate mode: between k and ``approx_cap(k)`` entries, all at least
    as large in magnitude as every entry left out. ValueError on k outside [0, n], a
    non-float dtype, NaN or Inf. Dispatches (``dispatch.backend``) to Triton, the fast CPU
    implementation or the torch reference.
    """
    return _magnitude(x, k, exact, None)


def topk_magnitude_torch(x: torch.Tensor, k: int, exact: bool = True):
    """The torch reference of :func:`topk_magnitude` (same contract)."""
    return _magnitude(x, k, exact, "torch")


def topk_magnitude_cpu(x: torch.Tensor, k: int, exact: bool = True):
    """The fast CPU implementation of :func:`topk_magnitude` (same contract; CPU tensors).

    Exact mode returns the reference's selection; approximate mode usually returns exactly
    the exact selection too (a threshold set within the tolerance, see the module doc).
    """
    return _magnitude(x, k, exact, "cpu")


def topk_magnitude_triton(x: torch.Tensor, k: int, exact: bool = True):
    """The Triton implementation of :func:`topk_magnitude` (same contract)."""
    return _magnitude(x, k, exact, "triton")


def _blocks(x: torch.Tensor, block_size: int, k: int, exact: bool, impl: str | None):
    flat = _flat(x, "x")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    k = check_k(k, block_size, "k (per block)")
    if flat.numel() == 0:
        return flat[:0], torch.zeros(0, dtype=torch.int64, device=flat.device)
    if impl is None:
        impl = backend(flat)
    values, indices, _ = run_select(flat, None, block_size, k, exact, True, impl)
    return values, indices


def topk_blocks(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """Top-k by magnitude in each block of ``block_size`` consecutive entries of flat x.

    Returns flat ``(values, indices)``: block after block, ``min(k, len(block))`` entries
    each (the last block may be shorter than block_size), indices block-local int64 and
    ascending within a block. When every block holds at least k entries the result views
    as ``(num_blocks, k)``. Exact mode: ties to the lower index. Approximate mode: still
    ``min(k, len)`` entries per block, each among the ``approx_cap(k)`` largest of its
    block (the fast CPU implementation returns the exact selection). ValueError on
    0 > k > block_size, block_size <= 0, non-float dtype, NaN/Inf.
    """
    return _blocks(x, block_size, k, exact, None)


def topk_blocks_torch(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The torch reference of :func:`topk_blocks`."""
    return _blocks(x, block_size, k, exact, "torch")


def topk_blocks_cpu(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The fast CPU implementation of :func:`topk_blocks` (exact selection in both modes)."""
    return _blocks(x, block_size, k, exact, "cpu")


def topk_blocks_triton(x: torch.Tensor, block_size: int, k: int, exact: bool = True):
    """The Triton implementation of :func:`topk_blocks`."""
    return _blocks(x, block_size, k, exact, "triton")


# ----------------------------------------------------------------------------------------
# The candidate pass on its own: entries at or above a per-row threshold
# ----------------------------------------------------------------------------------------
def _above(rows: torch.Tensor, thresholds: torch.Tensor, impl: str | None):
    check_float(rows, "rows")
    check_float(thresholds, "thresholds")
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (rows, columns), got shape {tuple(rows.shape)}")
    s, c = rows.shape
    if thresholds.shape != (s,) or thresholds.dtype != rows.dtype:
        raise ValueError(f"thresholds must be 1-D of length {s} and dtype {rows.dtype}, got "
                         f"shape {tuple(thresholds.shape)} and dtype {thresholds.dtype}")
    check_finite(thresholds, "thresholds")
    if impl is None:
        # No Triton kernel: on CUDA the reference's compare and nonzero are already fast.
        impl = "cpu" if backend(rows, thresholds) == "cpu" else "torch"
    if rows.numel() == 0:
        return rows.new_empty(0), torch.zeros(0, dtype=torch.int64, device=rows.device)
    if impl == "torch":
        check_finite(rows, "rows")
        flat = rows.reshape(-1)
        indices = (flat.abs() >= thresholds.repeat_interleave(c)).nonzero().view(-1)
        return flat[indices], indices
    require_cpu(rows, thresholds)
    src = _CpuSource(rows.reshape(-1).contiguous(), None, "rows")
    thr = thresholds.detach().contiguous().view(_INT_VIEW[rows.dtype]).numpy()
    pos, bits = _cpu_candidates(src, _cpu_segments(0, np.arange(s), c), c, thr)
    # NaN and Inf have the largest bit patterns: they are always candidates, so this
    # check on the candidates alone covers the whole input.
    src.check(src.magnitudes(bits))
    return torch.from_numpy(bits).view(rows.dtype), torch.from_numpy(pos)


def above_threshold(rows: torch.Tensor, thresholds: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of 2-D ``rows`` (s, c) with ``|v| >= thresholds[row]``: ``(values,
    indices)``, indices int64 row-major flat positions (``row * c + column``), ascending,
    and ``values = rows.reshape(-1)[indices]``.

    ``thresholds``: 1-D of length s, the dtype of ``rows``, finite (a negative threshold
    selects the whole row). ValueError on NaN/Inf in rows or thresholds, a non-float
    dtype or mismatched shapes. This is the candidate pass of the fast CPU top-k, usable
    on its own (threshold reuse). Dispatches to the fast CPU implementation for CPU
    tensors and to the torch reference otherwise (no Triton kernel).
    """
    return _above(rows, thresholds, None)


def above_threshold_cpu(rows: torch.Tensor, thresholds: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast CPU implementation of :func:`above_threshold` (CPU tensors): one chunked
    numpy pass comparing the float bit patterns as integers."""
    return _above(rows, thresholds, "cpu")


def above_threshold_torch(rows: torch.Tensor, thresholds: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`above_threshold` (any device; same contract)."""
    return _above(rows, thresholds, "torch")
