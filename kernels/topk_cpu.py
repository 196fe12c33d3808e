"""The fast CPU implementation of top-k selection (and of ``above_threshold``).

A different algorithm from the threshold search of ``topk_search``, with the same results
(exact mode: the same indices; approximate flat mode: a threshold set within the
tolerance, or the exact set). `select_cpu` is the CPU path of ``topk.run_select``;
`above_threshold_rows` is its candidate pass on its own. The algorithm is described above
the constants.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .dispatch import cpu_map, require_cpu
from .topk_policy import INT_VIEW, approx_cap, to_bits

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
        self.itype = INT_VIEW[self.dtype]
        nptype = _NP_INT[self.dtype]
        self.mask = nptype(np.iinfo(nptype).max)       # clears the sign bit
        self.inf_bits = nptype(to_bits(torch.tensor([float("inf")], dtype=self.dtype)).item())
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
        x = self.x.view(INT_VIEW[self.x.dtype]).numpy()[pos]
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


def select_cpu(x: torch.Tensor, y: torch.Tensor | None, row_len: int, k: int,
               exact: bool, fixed_count: bool):
    """The CPU path of ``topk.run_select`` (same arguments and result)."""
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



def above_threshold_rows(rows: torch.Tensor, thresholds: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path of ``topk.above_threshold`` (arguments already checked): the entries of
    2-D CPU ``rows`` with ``|v| >= thresholds[row]``, as (values, row-major positions)."""
    require_cpu(rows, thresholds)
    s, c = rows.shape
    src = _CpuSource(rows.reshape(-1).contiguous(), None, "rows")
    thr = thresholds.detach().contiguous().view(INT_VIEW[rows.dtype]).numpy()
    pos, bits = _cpu_candidates(src, _cpu_segments(0, np.arange(s), c), c, thr)
    # NaN and Inf have the largest bit patterns: they are always candidates, so this
    # check on the candidates alone covers the whole input.
    src.check(src.magnitudes(bits))
    return torch.from_numpy(bits).view(rows.dtype), torch.from_numpy(pos)
