"""Sparse allreduce with error feedback: SparDL, and the TopkA / gTopk / dense baselines.

Every algorithm has the same contract (`sparse_allreduce`): with X = tensor + residual on
each rank, `tensor` becomes the *mean over ranks* of the sparsified sum, `residual` what
this rank keeps for the next step, and nothing is lost or counted twice:

    Σ_ranks residual_after + P · tensor_after == Σ_ranks X          (to float rounding)

SparDL (DESIGN.md section 5), with P ranks in d teams of m = P/d consecutive ranks
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
is ≈ 2·(m−1)·k_b·pair_bytes, within DESIGN.md's 4k(P−1)/P words (a pair <= 2 words) up to
the headers and the (m−1)·4 count bytes (asserted in tests/test_sparse_allreduce.py).

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

A per-call-site `SparseAllreduce` object carries the adaptive h; the functional
`sparse_allreduce` keeps one per residual tensor. Inputs are checked across ranks by one
small allreduce per call (`COMMRT_VALIDATE=0` skips it): a bad input on any rank raises
ValueError on every rank instead of hanging the others.
"""
from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

from . import _kernels as KK
from ._common import agree, budget, check_pair, dtype_code, float_code, resolve_group, \
    work_dtype
from .schedules import bruck_allgather_schedule, recursive_doubling_schedule, \
    spardl_round_plan

ALGORITHMS = ("spardl", "topka", "gtopk", "dense")
SAG_VARIANTS = ("bruck", "recursive")

_TAG_REDUCE_SCATTER = 0x5D00
_TAG_SAG = 0x5D40
_TAG_ALL_GATHER = 0x5D80
_TAG_GTOPK = 0x5DC0


# --------------------------------------------------------------------------------------
# Team layout


class TeamLayout(NamedTuple):
    """P ranks in `teams` teams of m = P/teams consecutive ranks."""

    rank: int
    size: int
    teams: int

    @property
    def m(self) -> int:
        return self.size // self.teams

    @property
    def team(self) -> int:
        return self.rank // self.m

    @property
    def member(self) -> int:
        return self.rank % self.m

    def rank_of(self, team: int, member: int) -> int:
        return (team % self.teams) * self.m + (member % self.m)


def _layout(comm, teams: int) -> TeamLayout:
    if not isinstance(teams, int) or teams < 1 or comm.size % teams:
        raise ValueError(f"teams={teams!r} must be a positive integer dividing the world "
                         f"size {comm.size}")
    return TeamLayout(comm.rank, comm.size, teams)


def _exchange(comm, send_buf: torch.Tensor, dest: int, recv_nbytes: int, source: int,
              tag: int, kind: str) -> torch.Tensor:
    """One bundled message out to `dest` and one in from `source` (receive posted first)."""
    recv_buf = torch.empty(recv_nbytes, dtype=torch.uint8, device=send_buf.device)
    rreq = comm.irecv(recv_buf, source, tag, kind=kind)
    sreq = comm.isend(send_buf, dest, tag, kind=kind)
    rreq.wait()
    sreq.wait()
    return recv_buf


# --------------------------------------------------------------------------------------
# Spar-Reduce-Scatter


class ReduceScatterResult(NamedTuple):
    block_index: int        # the block this rank owns (= its in-team rank)
    block: torch.Tensor     # (c,) the team's accumulated sum of that block, as it arrived
    dropped: torch.Tensor   # (m·c,) what this rank sparsified away (0 on its own block)


def _spar_reduce_scatter(comm, lay: TeamLayout, acc: torch.Tensor, dropped: torch.Tensor,
                         k_block: int, kind: str) -> None:
    """In place on (m, c) tensors: afterwards acc[member] is the owned accumulated block and
    dropped holds, for every block this rank sent, the accumulated block minus what it sent."""
    m, c = acc.shape
    dtype, device = acc.dtype, acc.device
    flat = acc.view(-1)
    for rnd, plan in enumerate(spardl_round_plan(lay.member, m)):
        s = len(plan.send_blocks)
        recv_buf = torch.empty(KK.pair_nbytes(s * k_block, dtype, c), dtype=torch.uint8,
                               device=device)
        rreq = comm.irecv(recv_buf, lay.rank_of(lay.team, plan.source),
                          _TAG_REDUCE_SCATTER + rnd, kind=kind)
        send_rows = torch.tensor(plan.send_blocks, dtype=torch.int64, device=device)
        rows = acc.index_select(0, send_rows)
        values, local = KK.topk_rows(rows, k_block)
        rows.scatter_(1, local, 0)
        dropped.index_copy_(0, send_rows, rows)
        sreq = comm.isend(KK.pack(values, local, c), lay.rank_of(lay.team, plan.dest),
                          _TAG_REDUCE_SCATTER + rnd, kind=kind)
        rreq.wait()
        sreq.wait()
        r_values, r_local = KK.unpack(recv_buf, dtype, c)
        recv_rows = torch.tensor(plan.recv_blocks, dtype=torch.int64, device=device)
        offsets = (recv_rows * c).repeat_interleave(k_block)
        KK.scatter_add_(flat, r_local + offsets, r_values)


def spar_reduce_scatter(x: torch.Tensor, density: float, *, teams: int = 1,
                        group: Any = None) -> ReduceScatterResult:
    """Spar-Reduce-Scatter of flat `x` inside each team (collective over `group`).

    x (n elements, float) is padded to m·c and split into m blocks of c = ⌈n/m⌉; block i
    ends on in-team rank i. Every block is top-k_b-sparsified (k_b = ⌈density·c⌉) from the
    sender's accumulated partial sum just before it leaves, all blocks of a round in one
    message: ⌈log2 m⌉ messages of s·k_b pairs per rank (kind
    "spardl.reduce_scatter"). Conservation inside a team:
    Σ_team dropped + (every owner's block at its place) == Σ_team pad(x).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} must be a number in (0, 1]")
    comm = resolve_group(group)
    lay = _layout(comm, teams)
    x = x.reshape(-1)
    m = lay.m
    c = max(1, -(-x.numel() // m))
    acc = torch.zeros(m * c, dtype=work_dtype(x.dtype), device=x.device)
    acc[: x.numel()] = x
    acc = acc.view(m, c)
    dropped = torch.zeros_like(acc)
    _spar_reduce_scatter(comm, lay, acc, dropped, budget(density, c),
                         "spardl.reduce_scatter")
    return ReduceScatterResult(lay.member, acc[lay.member].clone(), dropped.view(-1))


# --------------------------------------------------------------------------------------
# Spar-All-Gather


def _gather_sets(comm, lay: TeamLayout, values: torch.Tensor, local: torch.Tensor, c: int,
                 sag: str, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All-gather equally sized sparse sets among the d ranks sharing this in-team rank;
    returns the d sets in team order."""
    d, h = lay.teams, values.numel()
    dtype, device = values.dtype, values.device
    if sag == "bruck":
        held = [(values, local)]          # held[o] is the set of team (team + o) mod d
        for step, (gap, count) in enumerate(bruck_allgather_schedule(d)):
            out = held[:count]
            buf = KK.pack(torch.cat([v for v, _ in out]), torch.cat([i for _, i in out]), c)
            got = _exchange(comm, buf, lay.rank_of(lay.team - gap, lay.member),
                            KK.pair_nbytes(count * h, dtype, c),
                            lay.rank_of(lay.team + gap, lay.member), _TAG_SAG + step, kind)
            r_values, r_local = KK.unpack(got, dtype, c)
            held += list(zip(r_values.split(h), r_local.split(h)))
        by_team = {(lay.team + o) % d: s for o, s in enumerate(held)}
    elif sag == "recursive":
        by_team = {lay.team: (values, local)}
        for step, mask in enumerate(recursive_doubling_schedule(d)):
            mine = sorted(by_team)
            partner = lay.team ^ mask
            buf = KK.pack(torch.cat([by_team[t][0] for t in mine]),
                          torch.cat([by_team[t][1] for t in mine]), c)
            got = _exchange(comm, buf, lay.rank_of(partner, lay.member),
                            KK.pair_nbytes(len(mine) * h, dtype, c),
                            lay.rank_of(partner, lay.member), _TAG_SAG + step, kind)
            r_values, r_local = KK.unpack(got, dtype, c)
            theirs = sorted(t ^ mask for t in mine)
            by_team.update(zip(theirs, zip(r_values.split(h), r_local.split(h))))
    else:
        raise ValueError(f"sag={sag!r} must be one of {SAG_VARIANTS}")
    return [by_team[t] for t in range(d)]


def _union_top(sets: list[tuple[torch.Tensor, torch.Tensor]], c: int, k_block: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the sets (in the given order) and keep the top-k_block of the union."""
    values0 = sets[0][0]
    dense = torch.zeros(c, dtype=values0.dtype, device=values0.device)
    member = torch.zeros(c, dtype=torch.bool, device=values0.device)
    for values, local in sets:
        KK.scatter_add_(dense, local, values)
        member[local] = True
    union = member.nonzero().view(-1)
    size = union.numel()
    if size > k_block:
        values, pick = KK.topk(dense[union], k_block)
        return values, union[pick], size
    return dense[union], union, size


def _team_allgather(comm, lay: TeamLayout, values: torch.Tensor, local: torch.Tensor,
                    c: int, k_block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bruck all-gather of every in-team rank's final block (at most k_block pairs, sent
    as k_block slots + an int32 count). Returns (values, global indices in [0, m·c))."""
    m = lay.m
    dtype, device = values.dtype, values.device
    count = values.numel()
    slot_v = torch.zeros(k_block, dtype=dtype, device=device)
    slot_i = torch.zeros(k_block, dtype=torch.int64, device=device)
    slot_v[:count] = values
    slot_i[:count] = local
    held_v, held_i = [slot_v], [slot_i]      # held[o] is block (member + o) mod m
    held_n = [torch.tensor([count], dtype=torch.int32, device=device)]
    for step, (gap, items) in enumerate(bruck_allgather_schedule(m)):
        buf = torch.cat([KK.pack(torch.cat(held_v[:items]), torch.cat(held_i[:items]), c),
                         torch.cat(held_n[:items]).view(torch.uint8)])
        split = KK.pair_nbytes(items * k_block, dtype, c)
        got = _exchange(comm, buf, lay.rank_of(lay.team, lay.member - gap),
                        split + 4 * items, lay.rank_of(lay.team, lay.member + gap),
                        _TAG_ALL_GATHER + step, kind)
        r_values, r_local = KK.unpack(got[:split], dtype, c)
        counts = got[split:].clone().view(torch.int32)
        held_v += list(r_values.split(k_block))
        held_i += list(r_local.split(k_block))
        held_n += list(counts.split(1))
    all_v = torch.stack(held_v)                  # (m, k_block), row o = block member+o
    all_i = torch.stack(held_i)
    all_n = torch.cat(held_n).to(torch.int64)
    blocks = (torch.arange(m, device=device) + lay.member) % m
    valid = torch.arange(k_block, device=device).unsqueeze(0) < all_n.unsqueeze(1)
    global_idx = all_i + (blocks * c).unsqueeze(1)
    return all_v[valid], global_idx[valid]


class AllGatherResult(NamedTuple):
    values: torch.Tensor    # the summed sparse result, on every rank
    indices: torch.Tensor   # global indices into the padded m·c vector (unique)
    union_size: int         # size of this rank's block union before the top-k_b (SAG)


def spar_all_gather(values: torch.Tensor, indices: torch.Tensor, block_size: int,
                    k_block: int, *, teams: int = 1, sag: str = "bruck",
                    group: Any = None) -> AllGatherResult:
    """Spar-All-Gather (collective over `group`): from every rank's sparse entries of its
    owned block (values, block-local indices < block_size; the same count h on the d
    ranks sharing an in-team rank), the global sparse sum on every rank.

    Between teams (d > 1) the d owners of block i exchange their sets (B-SAG or R-SAG,
    ⌈log2 d⌉ messages of sets·h pairs, kind "spardl.sag"), sum the union in team order and
    keep its top-k_block if it is larger; then a Bruck all-gather inside the team collects
    the m final blocks (⌈log2 m⌉ messages of blocks·(k_block pairs + 4 bytes), kind
    "spardl.all_gather"). Every rank returns the same (values, indices); with d = 1 this
    is the plain in-team all-gather of the given blocks (at most k_block entries each).
    """
    comm = resolve_group(group)
    lay = _layout(comm, teams)
    if sag not in SAG_VARIANTS:
        raise ValueError(f"sag={sag!r} must be one of {SAG_VARIANTS}")
    if sag == "recursive" and teams & (teams - 1):
        raise ValueError(f"sag='recursive' (R-SAG) needs a power-of-two number of teams, "
                         f"got {teams}; use sag='bruck'")
    if not 1 <= k_block <= block_size:
        raise ValueError(f"k_block={k_block} must lie in [1, block_size={block_size}]")
    values = values.reshape(-1)
    indices = indices.reshape(-1).to(torch.int64)
    if lay.teams > 1:
        sets = _gather_sets(comm, lay, values, indices, block_size, sag, "spardl.sag")
        values, indices, union = _union_top(sets, block_size, k_block)
    else:
        union = values.numel()
        if union > k_block:
            raise ValueError(f"a block may carry at most k_block={k_block} entries, got {union}")
    out_v, out_i = _team_allgather(comm, lay, values, indices, block_size, k_block,
                                   "spardl.all_gather")
    return AllGatherResult(out_v, out_i, union)


# --------------------------------------------------------------------------------------
# The algorithms


class SparseAllreduce:
    """A sparse allreduce call site: configuration plus SparDL's adaptive h.

    ``reducer = SparseAllreduce(0.01, "spardl", teams=2)``; then every step
    ``reducer(tensor, residual)`` (see `sparse_allreduce` for the contract). Keep one object
    per gradient stream (the DDP hooks keep one per process group, with h per bucket via
    `key`), so that h adapts to that stream. `last` describes the latest call (sizes,
    budgets, h, union) for tests and benchmarks.
    """

    def __init__(self, density: float, algorithm: str = "spardl", *, teams: int = 1,
                 sag: str = "bruck", group: Any = None) -> None:
        error = _param_error(density, algorithm, teams, sag, None)
        if error:
            raise ValueError(error)
        self.density = float(density)
        self.algorithm = algorithm
        self.teams = teams
        self.sag = sag
        self.group = group
        self._comm = None
        self._h: dict[Any, int] = {}
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
        """The adaptive SAG budgets per call-site key (what a resumed run needs)."""
        return {"adaptive_h": dict(self._h)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._h = dict(state["adaptive_h"])

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
        dtype = work_dtype(tensor.dtype)
        x = tensor.reshape(-1).to(dtype) + residual.reshape(-1).to(dtype)
        if self.algorithm == "dense":
            mean, new_residual = self._dense(comm, x)
        elif self.algorithm == "topka":
            mean, new_residual = self._topka(comm, x)
        elif self.algorithm == "gtopk":
            mean, new_residual = self._gtopk(comm, x)
        else:
            mean, new_residual = self._spardl(comm, x, key)
        residual.copy_(new_residual.view(residual.shape))
        tensor.copy_(mean.view(tensor.shape))
        return tensor

    # -- SparDL ---------------------------------------------------------------------

    def _spardl(self, comm, x: torch.Tensor, key: Any):
        lay = TeamLayout(comm.rank, comm.size, self.teams)
        n, m, d = x.numel(), lay.m, lay.teams
        c = -(-n // m)
        k_block = budget(self.density, c)
        acc = torch.zeros(m * c, dtype=x.dtype, device=x.device)
        acc[:n] = x
        acc = acc.view(m, c)
        dropped = torch.zeros_like(acc)
        _spar_reduce_scatter(comm, lay, acc, dropped, k_block, "spardl.reduce_scatter")
        own = acc[lay.member]
        h = None
        if d == 1:
            values, local = KK.topk(own, k_block)
        else:
            h = min(self._h.get(key, k_block), c)
            values, local = KK.topk(own, h)
        kept = own.clone()
        kept[local] = 0
        dropped[lay.member] = kept
        result = spar_all_gather(values, local, c, k_block, teams=d, sag=self.sag,
                                 group=comm)
        if d > 1:
            # Aim the next union at k_block, assuming it scales with h.
            self._h[key] = max(1, min(k_block, -(-h * k_block // max(result.union_size, 1))))
        total = torch.zeros(m * c, dtype=x.dtype, device=x.device)
        total[result.indices] = result.values
        selected = torch.zeros(m * c, dtype=torch.bool, device=x.device)
        selected[result.indices] = True
        new_residual = torch.where(selected[:n], dropped.view(-1)[:n], x)
        self.last = {"algorithm": "spardl", "n": n, "m": m, "teams": d, "c": c,
                     "k_block": k_block, "h": h, "union": result.union_size,
                     "selected": int(result.indices.numel())}
        return total[:n] / comm.size, new_residual

    # -- baselines ------------------------------------------------------------------

    def _dense(self, comm, x: torch.Tensor):
        comm.iallreduce(x, "sum", kind="dense.all_reduce").wait()
        self.last = {"algorithm": "dense", "n": x.numel()}
        return x / comm.size, torch.zeros_like(x)

    def _topka(self, comm, x: torch.Tensor):
        n, P = x.numel(), comm.size
        k = budget(self.density, n)
        values, indices = KK.topk(x, k)
        new_residual = x.clone()
        new_residual[indices] = 0
        buf = KK.pack(values, indices, n)
        out = torch.empty(P * buf.numel(), dtype=torch.uint8, device=x.device)
        comm.iallgather(buf, out, kind="topka.all_gather").wait()
        total = torch.zeros_like(x)
        for piece in out.view(P, -1):      # rank order: the same sum on every rank
            r_values, r_indices = KK.unpack(piece, x.dtype, n)
            KK.scatter_add_(total, r_indices, r_values)
        self.last = {"algorithm": "topka", "n": n, "k": k}
        return total / P, new_residual

    def _gtopk(self, comm, x: torch.Tensor):
        n, P, rank = x.numel(), comm.size, comm.rank
        k = budget(self.density, n)
        values, indices = KK.topk(x, k)
        new_residual = x.clone()
        new_residual[indices] = 0
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
            KK.scatter_add_(new_residual, dropped[1], dropped[0])

        mine = (values, indices)
        if rank >= p2:
            partner = rank - p2
            comm.isend(KK.pack(*mine, n), partner, _TAG_GTOPK, kind=kind).wait()
            got = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
            comm.irecv(got, partner, _TAG_GTOPK + 63, kind=kind).wait()
            mine = KK.unpack(got, x.dtype, n)
        else:
            if rank < extra:
                got = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
                comm.irecv(got, rank + p2, _TAG_GTOPK, kind=kind).wait()
                mine, dropped = merge(mine, KK.unpack(got, x.dtype, n))
                keep_dropped(dropped)
            for step, mask in enumerate(recursive_doubling_schedule(p2)):
                partner = rank ^ mask
                got = _exchange(comm, KK.pack(*mine, n), partner, nbytes, partner,
                                _TAG_GTOPK + 1 + step, kind)
                theirs = KK.unpack(got, x.dtype, n)
                pair = (mine, theirs) if rank < partner else (theirs, mine)
                mine, dropped = merge(*pair)
                if rank & (2 * mask - 1) == 0:
                    keep_dropped(dropped)
            if rank < extra:
                comm.isend(KK.pack(*mine, n), rank + p2, _TAG_GTOPK + 63, kind=kind).wait()
        total = torch.zeros_like(x)
        total[mine[1]] = mine[0]
        self.last = {"algorithm": "gtopk", "n": n, "k": k}
        return total / P, new_residual


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
    density, algorithm, teams, sag = config[:4]
    state = SparseAllreduce(density, algorithm, teams=teams, sag=sag, group=comm)
    _call_sites[key] = (weakref.ref(residual), config, state)
    weakref.finalize(residual, _call_sites.pop, key, None)
    return state


def sparse_allreduce(tensor: torch.Tensor, residual: torch.Tensor, density: float, *,
                     algorithm: str = "spardl", teams: int = 1, sag: str = "bruck",
                     group: Any = None, state: SparseAllreduce | None = None
                     ) -> torch.Tensor:
    """Sparsified mean over ranks with error feedback, in place (collective over `group`).

    On every rank X = tensor + residual. Afterwards `tensor` holds the mean over ranks of
    the selected sparse sum (the same on every rank) and `residual` what this rank keeps:
    Σ_ranks residual_after + P·tensor_after == Σ_ranks X, to float rounding.

    algorithm: "spardl" (teams d dividing P; sag "bruck" for any d or "recursive" for a
    power of two), "topka", "gtopk", or "dense" (exact mean of X, residual zeroed, density
    ignored except for validation). density in (0, 1]; density 1 gives the exact mean.
    group: None (default group) | commrt.transports Communicator | torch ProcessGroup.
    float16/bfloat16 are computed and sent as float32. Empty tensors are a no-op. Per-rank
    wire bytes: see the module docstring. SparDL's adaptive h lives in `state`; without
    one, a SparseAllreduce is kept per residual tensor (one per call site).
    Raises ValueError on every rank for a bad density/algorithm/teams/sag, a residual of
    another shape/dtype/device, or tensors whose size or dtype differ across ranks.
    """
    comm = resolve_group(group) if state is None else state.comm
    if state is None:
        error = check_pair(tensor, residual) or _param_error(density, algorithm, teams, sag,
                                                             comm.size)
        agree(comm, error, _signature(tensor, density, algorithm, teams, sag),
              "sparse_allreduce")
        state = _state_for(residual, (float(density), algorithm, teams, sag, id(group)), comm)
        return state(tensor, residual, key=tensor.numel(), validate=False)
    return state(tensor, residual, key=tensor.numel())
