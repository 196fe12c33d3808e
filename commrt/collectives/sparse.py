"""Sparse allreduce with error feedback: SparDL, and the TopkA / gTopk / dense baselines.

Every algorithm has the same contract (`sparse_allreduce`): with X = tensor + residual on
each rank, `tensor` becomes the *mean over ranks* of the sparsified sum, `residual` what
this rank keeps for the next step, and nothing is lost or counted twice:

    Σ_ranks residual_after + P · tensor_after == Σ_ranks X          (to float rounding)

SparDL (docs/design.md §5), with P ranks in d teams of m = P/d consecutive ranks
(team t = ranks t·m ... t·m+m-1; in-team rank = rank mod m):

1. Spar-Reduce-Scatter inside each team. X is padded to m·c (c = ⌈n/m⌉) and split into m
   blocks, block i owned by in-team rank i; per-block budget k_b = ⌈ρ·c⌉. ⌈log2 m⌉ rounds
   (`schedules.spardl_block_schedule`); in each round a rank top-k_b-sparsifies every block
   it hands on *from its accumulated partial sum* and sends all of that round's blocks in
   one message, so every message is exactly s·k_b pairs. What it did not send of a block
   stays behind as this rank's dropped part of that block.
2. Spar-All-Gather between teams (d > 1): the d owners of block i (one per team) exchange
   their block's top-h entries (B-SAG: Bruck, any d; R-SAG: recursive doubling, d a power
   of two; ⌈log2 d⌉ steps), sum the union in team order (bitwise identical on all d
   owners), and keep its top-k_b if the union is larger. h adapts per call site so that
   the union lands near k_b: h ← clamp(⌈h·k_b/union⌉, 1, k_b), starting at h = k_b.
   With d = 1 the owner keeps the top-k_b of its accumulated block.
3. A Bruck all-gather inside each team (⌈log2 m⌉ messages) collects the m final blocks.
4. Global residual collection: coordinates outside the final global index set take
   residual = this rank's own X; coordinates inside keep what this rank dropped.

Wire bytes per rank. A message of q pairs is one commrt.kernels packed buffer,
pk(q) = packed_nbytes(q) = 8 (header) + align4(q·value_bytes) + q·index_bytes, indices
block-local (uint16 when c <= 65536, else int32): 6 bytes a pair for float32 plus at most
11 bytes a message. Kinds in the wire counter:

    spardl.reduce_scatter  Σ_rounds pk(s_i · k_b)                 (⌈log2 m⌉ messages)
    spardl.sag             Σ_steps pk(sets_j · h)                 (⌈log2 d⌉ messages)
    spardl.all_gather      Σ_steps pk(blocks_j · k_b) + 4·blocks_j (⌈log2 m⌉ messages)

The final all-gather sends k_b slots per block plus a 4-byte count (a union smaller than
k_b is zero-padded); all other messages carry exactly their pairs. With d = 1 the total
is ≈ 2·(m−1)·k_b·pair_bytes, within docs/design.md's 4k(P−1)/P words (a pair <= 2 words) up to
the headers and the (m−1)·4 count bytes (asserted in tests/collectives/test_coll_sparse.py).

Baselines: `topka` (every rank's exact top-k, k = ⌈ρn⌉, all-gathered: (P-1)·pk(k),
kind "topka.all_gather"), `gtopk` (global top-k by recursive doubling: every step
exchanges k pairs and keeps the top-k of the summed union, log2 P messages of pk(k) for
P a power of two; otherwise the P - 2^⌊log2 P⌋ extra ranks first fold
their top-k into a partner and get the result back: +1 message each on both sides; kind
"gtopk"), `dense` (exact MPI allreduce of X, residual zeroed: 2(P-1)/P · n · 4 bytes,
kind "dense.all_reduce"). Residuals of the baselines: topka and gtopk keep X minus the
rank's own top-k; in gtopk, what a merge drops (summed entries outside the merged top-k)
is added to the residual of the lowest rank of the merged group, so the invariant above
holds exactly for every baseline too.

A per-call-site `SparseAllreduce` object carries the adaptive h and, with threshold reuse
(``reuse_steps`` > 1, Ok-Topk's idea), the kept top-k thresholds; the functional
`sparse_allreduce` keeps one per residual tensor. Threshold reuse replaces most full top-k
searches by one threshold pass plus a top-k of the (at most (1+reuse_eps)·k) candidates;
it changes no selection, message, byte or result (`SparseAllreduce`).

Memory: X = tensor + residual is formed in the residual itself (float32/float64,
contiguous), the result written into the tensor, and SparDL's padded accumulator is a
work buffer kept by the call site (one per tensor size), so a call allocates only
k-sized temporaries. `last` also splits the call's wall time into transport waits and the
rest (`commrt.collectives.timing`). If a NaN/Inf raises ValueError, the residual may
hold X. Inputs are checked across ranks by one
small allreduce per call (the transport's agreement check): a bad input on any rank raises
ValueError on every rank instead of hanging the others.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from . import local_ops as KK
from . import timing
from .inputs import agree, budget, check_pair, dtype_code, float_code, resolve_group, work_dtype
from .schedules import recursive_doubling_schedule
from .spardl import SAG_VARIANTS, TeamLayout, exchange, reduce_scatter_blocks, spar_all_gather

ALGORITHMS = ("spardl", "topka", "gtopk", "dense")

# Message tag of gtopk's steps (SparDL's steps use 0x5D00-0x5DBF, spardl.py).
_TAG_GTOPK = 0x5DC0


class SparseAllreduce:
    """A sparse allreduce call site: configuration plus its adaptive state.

    ``reducer = SparseAllreduce(0.01, "spardl", teams=2)``; then every step
    ``reducer(tensor, residual)`` (see `sparse_allreduce` for the contract). Keep one object
    per gradient stream (the DDP hooks keep one per process group, with per-bucket state
    via `key`), so that the adaptive state follows that stream. `last` describes the
    latest call (sizes, budgets, h, union, per-site selection) for tests and benchmarks.

    Adaptive state (what `state_dict` returns, for checkpoints): SparDL's SAG budget h per
    key ("adaptive_h") and, with threshold reuse, the selection thresholds
    ("thresholds": {(key, site): {"values": [float per row], "age": calls served}}).

    Threshold reuse (Ok-Topk's idea; ``reuse_steps`` > 1): every top-k of the algorithm
    (per selection site: each Spar-Reduce-Scatter round, the owned block, the flat top-k
    of topka/gtopk) keeps the magnitude threshold of its last estimate for up to
    `reuse_steps` calls. A call with a kept threshold t takes the candidates |v| >= t in
    one pass; if every row's candidate count lies in [k, (1+reuse_eps)·k] the top-k of the
    candidates is the answer (all entries >= t include the top-k, ties to the lower
    index as in the full top-k), otherwise, or once the threshold has served
    `reuse_steps` calls, the threshold is re-estimated: a full top-k' with
    k' = ⌊(1+reuse_eps/2)·k⌋, t = its smallest magnitude (aiming the next counts at the
    middle of the band), and the top-k of those k'. So the selection, the messages, the
    wire bytes and the result are exactly those without reuse; reuse only replaces the
    full top-k search by a threshold pass on most calls.
    """

    def __init__(self, density: float, algorithm: str = "spardl", *, teams: int = 1,
                 sag: str = "bruck", group: Any = None, reuse_steps: int = 1,
                 reuse_eps: float = 1.0) -> None:
        error = _param_error(density, algorithm, teams, sag, None) \
            or _reuse_error(reuse_steps, reuse_eps)
        if error:
            raise ValueError(error)
        self.density = float(density)
        self.algorithm = algorithm
        self.teams = teams
        self.sag = sag
        self.group = group
        self.reuse_steps = int(reuse_steps)
        self.reuse_eps = float(reuse_eps)
        self._comm = None
        self._h: dict[Any, int] = {}
        self._thresholds: dict[tuple, list] = {}    # (key, site) -> [thresholds, age]
        self._buffers = KK.WorkBuffers()
        self._site_key: Any = None
        self._selection: dict[str, dict[str, Any]] = {}
        self.last: dict[str, Any] = {}

    @property
    def comm(self):
        if self._comm is None:
            self._comm = resolve_group(self.group)
        return self._comm

    def h(self, key: Any = None) -> int | None:
        """The SAG budget h that the next call with `key` will use (None before the first)."""
        return self._h.get(key)

    def state_dict(self) -> dict[str, Any]:
        """The adaptive state a resumed run needs: SAG budgets h per call-site key
        ("adaptive_h") and the kept selection thresholds ("thresholds", see the class
        docstring); plain Python values."""
        return {"adaptive_h": dict(self._h),
                "thresholds": {site: {"values": list(thr), "age": age}
                               for site, (thr, age) in self._thresholds.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._h = dict(state["adaptive_h"])
        # checkpoints written before threshold reuse existed have no "thresholds"
        self._thresholds = {site: [[float(t) for t in entry["values"]], int(entry["age"])]
                            for site, entry in state.get("thresholds", {}).items()}

    def __call__(self, tensor: torch.Tensor, residual: torch.Tensor, *, key: Any = None,
                 validate: bool = True) -> torch.Tensor:
        comm = self.comm
        if validate:
            error = check_pair(tensor, residual) or _param_error(
                self.density, self.algorithm, self.teams, self.sag, comm.size)
            agree(comm, error, _signature(tensor, self.density, self.algorithm, self.teams,
                                          self.sag), "sparse_allreduce")
        n = tensor.numel()
        if n == 0:
            self.last = {"algorithm": self.algorithm, "n": 0}
            return tensor
        since = timing.mark()
        dtype = work_dtype(tensor.dtype)
        # X = tensor + residual is built in the residual's own memory when it can hold it:
        # every algorithm turns X into the new residual by changing few entries.
        in_place = residual.dtype == dtype and residual.is_contiguous()
        if in_place:
            x = residual.view(-1).add_(tensor.reshape(-1))
        else:
            x = tensor.reshape(-1).to(dtype) + residual.reshape(-1).to(dtype)
        direct = tensor.dtype == dtype and tensor.is_contiguous()
        out = tensor.view(-1) if direct else self._buffers.get("out", n, dtype, x.device)
        self._site_key, self._selection = key, {}
        if self.algorithm == "dense":
            self._dense(comm, x, out)
        elif self.algorithm == "topka":
            self._topka(comm, x, out)
        elif self.algorithm == "gtopk":
            self._gtopk(comm, x, out)
        else:
            self._spardl(comm, x, out, key)
        if not in_place:
            residual.copy_(x.view(residual.shape))
        if not direct:
            tensor.copy_(out.view(tensor.shape))
        self.last["selection"] = self._selection
        self.last.update(timing.split(since))
        return tensor

    # -- selection ------------------------------------------------------------------

    def _select(self, rows: torch.Tensor, k: int, site: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of every row of (s, c) `rows`: values (s, k), local int64 (s, k)
        indices ascending; with threshold reuse from the candidates above a kept
        threshold (class docstring). Records the site's outcome in `last["selection"]`."""
        s, c = rows.shape
        if self.reuse_steps <= 1 or s == 0 or k == 0 or k >= c:
            return KK.topk_rows(rows, k)
        key = (self._site_key, site)
        cap = int(k * (1.0 + self.reuse_eps))
        entry = self._thresholds.get(key)
        if entry is not None and entry[1] < self.reuse_steps and len(entry[0]) == s:
            thr = torch.tensor(entry[0], dtype=rows.dtype, device=rows.device)
            vals, flat = KK.above_threshold(rows, thr)
            row = flat // c if s > 1 else None
            counts = torch.bincount(row, minlength=s) if s > 1 else \
                torch.tensor([flat.numel()], device=flat.device)
            self._selection[site] = {"reused": False, "candidates": counts.tolist(),
                                     "k": k, "cap": cap}
            if bool(((counts >= k) & (counts <= cap)).all()):
                entry[1] += 1
                self._selection[site]["reused"] = True
                return _top_candidates(vals, flat, row, counts, c, k)
        else:
            self._selection[site] = {"reused": False, "candidates": None, "k": k, "cap": cap}
        k_est = min(c, max(k, int(k * (1.0 + self.reuse_eps / 2))))
        values, local = KK.topk_rows(rows, k_est)
        self._thresholds[key] = [values.abs().amin(1).tolist(), 1]
        if k_est == k:
            return values, local
        top, pick = KK.topk_rows(values, k)
        return top, local.gather(1, pick)

    # -- SparDL ---------------------------------------------------------------------

    def _spardl(self, comm, x: torch.Tensor, out: torch.Tensor, key: Any) -> None:
        lay = TeamLayout(comm.rank, comm.size, self.teams)
        n, m, d = x.numel(), lay.m, lay.teams
        c = -(-n // m)
        k_block = budget(self.density, c)
        acc = self._buffers.get("acc", m * c, x.dtype, x.device)
        acc[:n].copy_(x)
        acc[n:].zero_()
        acc = acc.view(m, c)
        reduce_scatter_blocks(comm, lay, acc, k_block, "spardl.reduce_scatter", self._select)
        own = acc[lay.member: lay.member + 1]
        h = None
        if d == 1:
            values, local = self._select(own, k_block, "own")
        else:
            h = min(self._h.get(key, k_block), c)
            values, local = self._select(own, h, "own")
        own.scatter_(1, local, 0)      # acc now holds, in every row, what this rank dropped
        result = spar_all_gather(values, local, c, k_block, teams=d, sag=self.sag,
                                 group=comm)
        if d > 1:
            # Aim the next union at k_block, assuming it scales with h.
            self._h[key] = max(1, min(k_block, -(-h * k_block // max(result.union_size, 1))))
        # Inside the final index set this rank keeps what it dropped; elsewhere its own X
        # (x already holds X there). Indices past n are padding (zero sums) and dropped.
        idx, vals = result.indices, result.values
        if n < m * c and idx.numel() and int(idx.max()) >= n:
            keep = idx < n
            idx, vals = idx[keep], vals[keep]
        x.index_copy_(0, idx, acc.view(-1).index_select(0, idx))
        out.zero_()
        out.index_copy_(0, idx, vals / comm.size)
        self.last = {"algorithm": "spardl", "n": n, "m": m, "teams": d, "c": c,
                     "k_block": k_block, "h": h, "union": result.union_size,
                     "selected": int(result.indices.numel())}

    # -- baselines ------------------------------------------------------------------

    def _dense(self, comm, x: torch.Tensor, out: torch.Tensor) -> None:
        timing.wait(comm.iallreduce(x, "sum", kind="dense.all_reduce"))
        torch.div(x, comm.size, out=out)
        x.zero_()
        self.last = {"algorithm": "dense", "n": x.numel()}

    def _top_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self._select(x.view(1, -1), k, "flat")
        return values.view(-1), indices.view(-1)

    def _topka(self, comm, x: torch.Tensor, out: torch.Tensor) -> None:
        n, P = x.numel(), comm.size
        k = budget(self.density, n)
        values, indices = self._top_flat(x, k)
        x[indices] = 0
        buf = KK.pack(values, indices, n)
        gathered = torch.empty(P * buf.numel(), dtype=torch.uint8, device=x.device)
        timing.wait(comm.iallgather(buf, gathered, kind="topka.all_gather"))
        out.zero_()
        for piece in gathered.view(P, -1):      # rank order: the same sum on every rank
            r_values, r_indices = KK.unpack(piece, x.dtype, n)
            KK.scatter_add_(out, r_indices, r_values)
        out.div_(P)
        self.last = {"algorithm": "topka", "n": n, "k": k}

    def _gtopk(self, comm, x: torch.Tensor, out: torch.Tensor) -> None:
        n, P, rank = x.numel(), comm.size, comm.rank
        k = budget(self.density, n)
        values, indices = self._top_flat(x, k)
        x[indices] = 0          # x becomes this rank's residual
        nbytes = KK.pair_nbytes(k, x.dtype, n)
        kind = "gtopk"
        p2 = 1 << (P.bit_length() - 1)
        extra = P - p2

        def merge(a, b):
            """Top-k of the summed union of two k-sets; the sum of what it drops."""
            idx = torch.cat([a[1], b[1]])
            val = torch.cat([a[0], b[0]])
            union, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=val.dtype, device=val.device)
            summed.index_add_(0, inverse, val)
            top_v, pick = KK.topk(summed, k)
            summed[pick] = 0
            return (top_v, union[pick]), (summed, union)

        def keep_dropped(dropped):
            # The merged group's lowest rank keeps what the merge dropped, so the group's
            # residuals plus its set still add up to the group's X.
            KK.scatter_add_(x, dropped[1], dropped[0])

        mine = (values, indices)
        if rank >= p2:
            partner = rank - p2
            timing.wait(comm.isend(KK.pack(*mine, n), partner, _TAG_GTOPK, kind=kind))
            got = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
            timing.wait(comm.irecv(got, partner, _TAG_GTOPK + 63, kind=kind))
            mine = KK.unpack(got, x.dtype, n)
        else:
            if rank < extra:
                got = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
                timing.wait(comm.irecv(got, rank + p2, _TAG_GTOPK, kind=kind))
                mine, dropped = merge(mine, KK.unpack(got, x.dtype, n))
                keep_dropped(dropped)
            for step, mask in enumerate(recursive_doubling_schedule(p2)):
                partner = rank ^ mask
                got = exchange(comm, KK.pack(*mine, n), partner, nbytes, partner,
                                _TAG_GTOPK + 1 + step, kind)
                theirs = KK.unpack(got, x.dtype, n)
                pair = (mine, theirs) if rank < partner else (theirs, mine)
                mine, dropped = merge(*pair)
                if rank & (2 * mask - 1) == 0:
                    keep_dropped(dropped)
            if rank < extra:
                timing.wait(comm.isend(KK.pack(*mine, n), rank + p2, _TAG_GTOPK + 63,
                                       kind=kind))
        out.zero_()
        out[mine[1]] = mine[0] / P
        self.last = {"algorithm": "gtopk", "n": n, "k": k}


def _top_candidates(vals: torch.Tensor, flat: torch.Tensor, row: torch.Tensor | None,
                    counts: torch.Tensor, c: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of every row of (s, c) rows from its candidates (values `vals` at
    row-major flat positions `flat`, ascending; row of each, None for one row; every row
    has >= k): values (s, k) and local int64 indices (s, k), ascending, ties to the lower
    index."""
    s = counts.numel()
    if row is None:
        top, pick = KK.topk(vals, k)
        return top.view(1, k), flat[pick].view(1, k)
    col = flat - row * c
    # Rows of unequal candidate counts, padded with zeros: a candidate is at least the
    # threshold, > 0 unless the row is all candidates (then no row is padded).
    width = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.numel(), device=flat.device) - start[row]
    pad_v = vals.new_zeros((s, width))
    pad_c = torch.zeros((s, width), dtype=torch.int64, device=flat.device)
    pad_v[row, pos] = vals
    pad_c[row, pos] = col
    top, pick = KK.topk_rows(pad_v, k)
    return top, pad_c.gather(1, pick)


def _reuse_error(reuse_steps: Any, reuse_eps: Any) -> str | None:
    if isinstance(reuse_steps, bool) or not isinstance(reuse_steps, int) or reuse_steps < 1:
        return f"reuse_steps={reuse_steps!r} must be an integer >= 1 (1: no threshold reuse)"
    if isinstance(reuse_eps, bool) or not isinstance(reuse_eps, (int, float)) \
            or not 0.0 < float(reuse_eps) <= 10.0:
        return f"reuse_eps={reuse_eps!r} must be a number in (0, 10]"
    return None


def _param_error(density: Any, algorithm: Any, teams: Any, sag: Any, size: int | None
                 ) -> str | None:
    if algorithm not in ALGORITHMS:
        return f"algorithm={algorithm!r} must be one of {ALGORITHMS}"
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0.0 < float(density) <= 1.0:
        return f"density={density!r} must be a number in (0, 1]"
    if isinstance(teams, bool) or not isinstance(teams, int) or teams < 1:
        return f"teams={teams!r} must be a positive integer"
    if sag not in SAG_VARIANTS:
        return f"sag={sag!r} must be one of {SAG_VARIANTS}"
    if algorithm == "spardl" and sag == "recursive" and teams & (teams - 1):
        return (f"sag='recursive' (R-SAG) needs a power-of-two number of teams, got "
                f"{teams}; use sag='bruck'")
    if size is not None and size % teams:
        return f"teams={teams} does not divide the world size {size}"
    return None


def _signature(tensor: Any, density: Any, algorithm: Any, teams: Any, sag: Any) -> list[int]:
    is_tensor = isinstance(tensor, torch.Tensor)
    return [tensor.numel() if is_tensor else -1,
            dtype_code(tensor.dtype) if is_tensor else -1,
            ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else -1,
            teams if isinstance(teams, int) else -1,
            SAG_VARIANTS.index(sag) if sag in SAG_VARIANTS else -1,
            float_code(density) if isinstance(density, (int, float)) else -1]


# --------------------------------------------------------------------------------------
# Functional API

_call_sites: dict[int, tuple[weakref.ref, tuple, SparseAllreduce]] = {}


def _state_for(residual: torch.Tensor, config: tuple, comm) -> SparseAllreduce:
    """The SparseAllreduce that belongs to this residual tensor (its call site)."""
    key = id(residual)
    entry = _call_sites.get(key)
    if entry is not None and entry[0]() is residual and entry[1] == config:
        return entry[2]
    density, algorithm, teams, sag, reuse_steps, reuse_eps = config[:6]
    state = SparseAllreduce(density, algorithm, teams=teams, sag=sag, group=comm,
                            reuse_steps=reuse_steps, reuse_eps=reuse_eps)
    _call_sites[key] = (weakref.ref(residual), config, state)
    weakref.finalize(residual, _call_sites.pop, key, None)
    return state


def sparse_allreduce(tensor: torch.Tensor, residual: torch.Tensor, density: float, *,
                     algorithm: str = "spardl", teams: int = 1, sag: str = "bruck",
                     group: Any = None, state: SparseAllreduce | None = None,
                     reuse_steps: int = 1, reuse_eps: float = 1.0) -> torch.Tensor:
    """Sparsified mean over ranks with error feedback, in place (collective over `group`).

    On every rank X = tensor + residual. Afterwards `tensor` holds the mean over ranks of
    the selected sparse sum (the same on every rank) and `residual` what this rank keeps:
    Σ_ranks residual_after + P·tensor_after == Σ_ranks X, to float rounding.

    algorithm: "spardl" (teams d dividing P; sag "bruck" for any d or "recursive" for a
    power of two), "topka", "gtopk", or "dense" (exact mean of X, residual zeroed, density
    ignored except for validation). density in (0, 1]; density 1 gives the exact mean.
    group: None (default group) | commrt.transports Communicator | torch ProcessGroup.
    float16/bfloat16 are computed and sent as float32. Empty tensors are a no-op. Per-rank
    wire bytes: see the module docstring. SparDL's adaptive h and the kept thresholds live
    in `state`; without one, a SparseAllreduce is kept per residual tensor (one per call
    site). reuse_steps / reuse_eps: threshold reuse (`SparseAllreduce`; 1 = off; the
    result is the same either way). They configure the kept state only when `state` is
    None (a given state carries its own).
    Raises ValueError on every rank for a bad density/algorithm/teams/sag, a residual of
    another shape/dtype/device, or tensors whose size or dtype differ across ranks.
    """
    comm = resolve_group(group) if state is None else state.comm
    if state is None:
        error = check_pair(tensor, residual) or _param_error(density, algorithm, teams, sag,
                                                             comm.size) \
            or _reuse_error(reuse_steps, reuse_eps)
        agree(comm, error, _signature(tensor, density, algorithm, teams, sag),
              "sparse_allreduce")
        state = _state_for(residual, (float(density), algorithm, teams, sag, reuse_steps,
                                      float(reuse_eps), id(group)), comm)
        return state(tensor, residual, key=tensor.numel(), validate=False)
    return state(tensor, residual, key=tensor.numel())
