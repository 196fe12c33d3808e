"""Communication schedules of the sparse collectives, as plain data (no communication).

Kept apart from the collectives so that the schedules can be checked exhaustively in a
single process (tests/collectives/test_coll_schedules.py) and reused by the benchmarks.

Notation (docs/design.md §5): a team has m ranks; the flattened gradient is split into
m blocks, block i owned by in-team rank i.
"""
from __future__ import annotations

from typing import NamedTuple


def ceil_log2(m: int) -> int:
    """⌈log2 m⌉ for m >= 1 (0 for m == 1)."""
    if m < 1:
        raise ValueError(f"ceil_log2 needs m >= 1, got {m}")
    return (m - 1).bit_length()


def spardl_block_schedule(m: int) -> list[tuple[int, int]]:
    """The Spar-Reduce-Scatter rounds for a team of m ranks, as (gap, blocks) pairs.

    R = ⌈log2 m⌉ rounds; the block counts are reversed([1, 2, ..., 2^(R-2), m - 2^(R-1)])
    and the partner distance starts at m - s[0] (= 2^(R-1)) and halves each round.
    m=8 -> [(4, 4), (2, 2), (1, 1)];  m=6 -> [(4, 2), (2, 2), (1, 1)];  m=1 -> [].
    """
    rounds = ceil_log2(m)
    if rounds == 0:
        return []
    counts = [1 << j for j in range(rounds - 1)] + [m - (1 << (rounds - 1))]
    counts.reverse()
    gaps = [1 << (rounds - 1 - i) for i in range(rounds)]
    return list(zip(gaps, counts))


class RoundPlan(NamedTuple):
    """What one in-team rank does in one Spar-Reduce-Scatter round."""

    dest: int                 # in-team rank the bundled message goes to
    source: int               # in-team rank the bundled message comes from
    send_blocks: list[int]    # blocks sparsified and sent (this rank drops them afterwards)
    recv_blocks: list[int]    # blocks received and added into the accumulator


def spardl_round_plan(member: int, m: int) -> list[RoundPlan]:
    """The Spar-Reduce-Scatter rounds of in-team rank `member` in a team of m.

    In the round with (gap, s), rank r sends blocks r+gap ... r+gap+s-1 (mod m) to r+gap
    and receives blocks r ... r+s-1 from r-gap. After the last round rank r holds block r,
    accumulated over all m ranks exactly once (checked for every m in the tests).
    """
    if not 0 <= member < m:
        raise ValueError(f"in-team rank {member} out of range for a team of {m}")
    plan = []
    for gap, s in spardl_block_schedule(m):
        plan.append(RoundPlan(
            dest=(member + gap) % m,
            source=(member - gap) % m,
            send_blocks=[(member + gap + j) % m for j in range(s)],
            recv_blocks=[(member + j) % m for j in range(s)],
        ))
    return plan


def bruck_allgather_schedule(m: int) -> list[tuple[int, int]]:
    """Bruck all-gather steps for m ranks, as (gap, items) pairs.

    In step j (gap = 2^j) rank r sends the first `items` = min(2^j, m - 2^j) items it holds
    (its own and those of r+1, r+2, ...) to r - gap and receives as many from r + gap.
    ⌈log2 m⌉ steps; after them rank r holds the items of r, r+1, ..., r+m-1 (mod m).
    """
    steps = []
    for j in range(ceil_log2(m)):
        gap = 1 << j
        steps.append((gap, min(gap, m - gap)))
    return steps


def recursive_doubling_schedule(d: int) -> list[int]:
    """Recursive-doubling partner masks for d (a power of two) ranks: step j pairs r with
    r XOR 2^j; the set of items held doubles each step."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"recursive doubling needs a power-of-two group size, got {d}")
    return [1 << j for j in range(ceil_log2(d))]
