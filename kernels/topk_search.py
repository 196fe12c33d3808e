"""Top-k selection by a threshold search: the Triton kernels beside their torch reference.

The algorithm of the Triton path (one search it shares with the approximate torch
reference, only the passes over memory differ): a strided sample of the magnitudes gives
candidate thresholds around the expected rank of the k-th largest; one counting pass
counts, per chunk of the row and per candidate, the entries ``>=`` each candidate; the
bracket ``[lo, hi)`` (count(lo) >= k > count(hi)) shrinks. Further rounds split the
bracket evenly in the thresholds' bit pattern (monotonic for non-negative floats), so the
search ends after a bounded number of rounds: when count(lo) is within the tolerance, or
when no float lies between lo and hi (then the entries equal to lo are ties, taken in
index order). One compaction pass writes the selected indices and values in index order,
from per-chunk counts and an in-chunk prefix sum. Exact mode is the same search with
tolerance zero. The torch reference of exact mode is an independent, simpler computation
(``torch.topk`` for the k-th magnitude, then a tie-ranked mask); the reference of
approximate mode runs the search with torch passes.

`select_triton` launches the kernels; `select_torch_exact` and `select_torch_search` are
the references. The policies they implement are in ``topk``'s docstring; ``topk.run_select``
picks one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dispatch import lazy_jit, require_triton, tl
from .topk_policy import APPROX_EPS, from_bits, to_bits

NUM_CANDIDATES = 32   # thresholds counted per pass (power of two for tl.arange)
SAMPLE_SIZE = 4096    # strided sample per row for the first round's candidates ...
SAMPLE_BUDGET = 1 << 20  # ... and over all rows together (many small blocks: fewer each)
COUNT_CHUNK = 1024    # elements per Triton program in the counting and compaction passes


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
class Rows:
    """A flat vector viewed as rows of ``row_len`` (the last one may be shorter)."""
    n: int
    row_len: int
    num_rows: int
    lengths: torch.Tensor   # int64 [R]
    budgets: torch.Tensor   # int64 [R] = min(k, length)

    @staticmethod
    def make(n: int, row_len: int, k: int, device: torch.device) -> Rows:
        row_len = min(row_len, n)   # one block longer than x: a single row of n
        num_rows = -(-n // row_len)
        lengths = torch.full((num_rows,), row_len, dtype=torch.int64, device=device)
        lengths[-1] = n - (num_rows - 1) * row_len
        return Rows(n, row_len, num_rows, lengths, lengths.clamp(max=k))


def _magnitudes(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return (x.to(y.dtype) + y).abs() if y is not None else x.abs()


def _column(counts: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """counts[r, :, which[r]] for every row r, as int64 [R, C]."""
    idx = which[:, None, None].expand(-1, counts.shape[1], 1)
    return counts.gather(2, idx).squeeze(2).to(torch.int64)


CountFn = Callable[[torch.Tensor, bool], torch.Tensor]


def _search(x: torch.Tensor, y: torch.Tensor | None, rows: Rows, exact: bool,
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
    inf_bits = int(to_bits(torch.tensor([float("inf")], dtype=dtype)).item())

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
    cand = to_bits(sample.gather(1, p).clamp(min=0.0))

    first = True
    done = (c_lo.sum(1) <= cap) | (budgets == 0)
    while True:
        cand = torch.where((cand > lo[:, None]) & (cand < hi[:, None]), cand,
                           torch.full_like(cand, inf_bits))
        counts = count(from_bits(cand, dtype), first)   # [R, C, B]
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
    lo_v, hi_v = from_bits(lo, dtype), from_bits(hi, dtype)
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
def select_triton(x: torch.Tensor, y: torch.Tensor | None, rows: Rows, exact: bool,
                  fixed_count: bool):
    """The Triton path of ``topk.run_select``: the search with the counting kernel, then the
    compaction kernel (which also writes ``y <- v`` minus the selection, with ``y``)."""
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


def _padded_magnitudes(v: torch.Tensor, rows: Rows) -> torch.Tensor:
    """|v| as [R, row_len] with -1 in the padding after the last row's end."""
    a = torch.full((rows.num_rows * rows.row_len,), -1.0, dtype=v.dtype, device=v.device)
    a[: rows.n] = v.abs()
    return a.view(rows.num_rows, rows.row_len)


def select_torch_search(x: torch.Tensor, y: torch.Tensor | None, rows: Rows,
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
                   quota: torch.Tensor, rows: Rows):
    """Select strong entries plus the first ``quota`` weak ones of each row, in index order."""
    weak_rank = weak_m.long().cumsum(1) - weak_m.long()
    sel = strong_m | (weak_m & (weak_rank < quota[:, None]))
    r, local = sel.nonzero(as_tuple=True)
    values = v[r * rows.row_len + local]
    return values, local, sel.sum(1)


def _compact_thresholds(v: torch.Tensor, a: torch.Tensor, strong: torch.Tensor,
                        weak: torch.Tensor, quota: torch.Tensor, rows: Rows):
    strong_m = a >= strong[:, None]
    weak_m = (a >= weak[:, None]) & ~strong_m
    return _compact_torch(v, strong_m, weak_m, quota, rows)


def select_torch_exact(v: torch.Tensor, rows: Rows):
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

