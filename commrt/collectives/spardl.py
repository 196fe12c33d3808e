"""SparDL's two sparse collectives, over teams of consecutive ranks: Spar-Reduce-Scatter
inside each team and Spar-All-Gather between teams (then a Bruck all-gather inside the
team). `sparse_allreduce` (sparse.py) composes them; its docstring gives the algorithm
step by step with its per-rank wire bytes (docs/design.md §5).

`spar_reduce_scatter` and `spar_all_gather` are the standalone collectives;
`reduce_scatter_blocks` is the in-place round loop they and `SparseAllreduce` share, and
`exchange` the one bundled message out and one in of every step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import local_ops as KK
from . import timing
from .inputs import budget, resolve_group, work_dtype
from .schedules import bruck_allgather_schedule, recursive_doubling_schedule, spardl_round_plan

SAG_VARIANTS = ("bruck", "recursive")

_TAG_REDUCE_SCATTER = 0x5D00
_TAG_SAG = 0x5D40
_TAG_ALL_GATHER = 0x5D80


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


def exchange(comm, send_buf: torch.Tensor, dest: int, recv_nbytes: int, source: int,
             tag: int, kind: str) -> torch.Tensor:
    """One bundled message out to `dest` and one in from `source` (receive posted first)."""
    recv_buf = torch.empty(recv_nbytes, dtype=torch.uint8, device=send_buf.device)
    rreq = comm.irecv(recv_buf, source, tag, kind=kind)
    sreq = comm.isend(send_buf, dest, tag, kind=kind)
    timing.wait(rreq, sreq)
    return recv_buf


# --------------------------------------------------------------------------------------
# Spar-Reduce-Scatter


class ReduceScatterResult(NamedTuple):
    block_index: int        # the block this rank owns (= its in-team rank)
    block: torch.Tensor     # (c,) the team's accumulated sum of that block, as it arrived
    dropped: torch.Tensor   # (m·c,) what this rank sparsified away (0 on its own block)


SelectRows = Callable[[torch.Tensor, int, str], "tuple[torch.Tensor, torch.Tensor]"]


def _exact_rows(rows: torch.Tensor, k: int, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KK.topk_rows(rows, k)


def _runs(first: int, count: int, m: int) -> list[tuple[int, int]]:
    """Blocks first, first+1, ..., first+count-1 (mod m) as at most two contiguous
    (start, length) runs, in that order."""
    first %= m
    head = min(count, m - first)
    return [(first, head)] + ([(0, count - head)] if count > head else [])


def reduce_scatter_blocks(comm, lay: TeamLayout, acc: torch.Tensor, k_block: int, kind: str,
                          select: SelectRows = _exact_rows) -> None:
    """In place on the (m, c) accumulator: afterwards acc[member] is the owned accumulated
    block and every other row what this rank dropped of that block (its accumulated block
    minus what it sent). A block is never received after it was sent (the schedule's
    receive sets shrink to the own block), so zeroing the sent entries in place is exact.
    `select(rows, k, site)` is the per-row top-k (exact, or with threshold reuse)."""
    m, c = acc.shape
    dtype, device = acc.dtype, acc.device
    flat = acc.view(-1)
    for rnd, plan in enumerate(spardl_round_plan(lay.member, m)):
        s = len(plan.send_blocks)
        recv_buf = torch.empty(KK.pair_nbytes(s * k_block, dtype, c), dtype=torch.uint8,
                               device=device)
        rreq = comm.irecv(recv_buf, lay.rank_of(lay.team, plan.source),
                          _TAG_REDUCE_SCATTER + rnd, kind=kind)
        values, local = [], []
        for part, (start, length) in enumerate(_runs(plan.send_blocks[0], s, m)):
            rows = acc[start:start + length]
            v, i = select(rows, k_block, f"rs{rnd}.{part}")
            rows.scatter_(1, i, 0)
            values.append(v)
            local.append(i)
        values = values[0] if len(values) == 1 else torch.cat(values)
        local = local[0] if len(local) == 1 else torch.cat(local)
        sreq = comm.isend(KK.pack(values, local, c), lay.rank_of(lay.team, plan.dest),
                          _TAG_REDUCE_SCATTER + rnd, kind=kind)
        timing.wait(rreq, sreq)
        r_values, r_local = KK.unpack(recv_buf, dtype, c)
        offsets = torch.tensor(plan.recv_blocks, dtype=torch.int64, device=device) * c
        KK.scatter_add_(flat, r_local.view(s, k_block).add_(offsets.unsqueeze(1)).view(-1),
                        r_values)


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
    reduce_scatter_blocks(comm, lay, acc, budget(density, c), "spardl.reduce_scatter")
    block = acc[lay.member].clone()
    acc[lay.member] = 0
    return ReduceScatterResult(lay.member, block, acc.view(-1))


# --------------------------------------------------------------------------------------
# Spar-All-Gather


def _gather_sets(comm, lay: TeamLayout, values: torch.Tensor, local: torch.Tensor, c: int,
                 sag: str, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All-gather equally sized sparse sets among the d ranks sharing this in-team rank;
    returns the d sets in team order."""
    d, h = lay.teams, values.numel()
    dtype = values.dtype
    if sag == "bruck":
        held = [(values, local)]          # held[o] is the set of team (team + o) mod d
        for step, (gap, count) in enumerate(bruck_allgather_schedule(d)):
            out = held[:count]
            buf = KK.pack(torch.cat([v for v, _ in out]), torch.cat([i for _, i in out]), c)
            got = exchange(comm, buf, lay.rank_of(lay.team - gap, lay.member),
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
            got = exchange(comm, buf, lay.rank_of(partner, lay.member),
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
    """Sum the sets (in the given order) and keep the top-k_block of the union; k-sized
    work only (the union's positions, ascending, and one scatter-add in set order)."""
    local = torch.cat([i for _, i in sets])
    union, inverse = torch.unique(local, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=sets[0][0].dtype, device=local.device)
    KK.scatter_add_(summed, inverse, torch.cat([v for v, _ in sets]))
    size = union.numel()
    if size > k_block:
        values, pick = KK.topk(summed, k_block)
        return values, union[pick], size
    return summed, union, size


def _team_allgather(comm, lay: TeamLayout, values: torch.Tensor, local: torch.Tensor,
                    c: int, k_block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bruck all-gather of every in-team rank's final block (at most k_block pairs, sent
    as k_block slots + an int32 count). Returns (values, global indices in [0, m·c))."""
    m = lay.m
    dtype, device = values.dtype, values.device
    count = values.numel()
    if count == k_block:                     # full (always with one team): no padding
        slot_v, slot_i = values, local
    else:
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
        got = exchange(comm, buf, lay.rank_of(lay.team, lay.member - gap),
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
    global_idx = all_i + (blocks * c).unsqueeze(1)
    if bool((all_n == k_block).all()):       # every block full: no slot to drop
        return all_v.view(-1), global_idx.view(-1)
    valid = torch.arange(k_block, device=device).unsqueeze(0) < all_n.unsqueeze(1)
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
