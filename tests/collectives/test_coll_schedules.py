"""Spar-Reduce-Scatter and all-gather schedules (single process, no MPI)."""
import pytest

from commrt.collectives.schedules import (
    bruck_allgather_schedule,
    ceil_log2,
    recursive_doubling_schedule,
    spardl_block_schedule,
    spardl_round_plan,
)


def test_sparse_schedule_examples():
    assert spardl_block_schedule(8) == [(4, 4), (2, 2), (1, 1)]
    assert spardl_block_schedule(6) == [(4, 2), (2, 2), (1, 1)]
    assert spardl_block_schedule(5) == [(4, 1), (2, 2), (1, 1)]
    assert spardl_block_schedule(2) == [(1, 1)]
    assert spardl_block_schedule(1) == []


@pytest.mark.parametrize("m", range(1, 18))
def test_sparse_schedule_every_block_reaches_owner_once(m):
    """Simulate the round plans: which ranks' contributions each held block carries."""
    rounds = ceil_log2(m)
    assert len(spardl_block_schedule(m)) == rounds
    # holding[r][b] = multiset (list) of contributors to block b currently held by rank r
    holding = [{b: [r] for b in range(m)} for r in range(m)]
    plans = [spardl_round_plan(r, m) for r in range(m)]
    for i in range(rounds):
        messages = {}
        for r in range(m):
            plan = plans[r][i]
            for b in plan.send_blocks:
                assert b in holding[r], f"m={m} round {i}: rank {r} sends block {b} it lacks"
            messages[(r, plan.dest)] = {b: holding[r].pop(b) for b in plan.send_blocks}
        for r in range(m):
            plan = plans[r][i]
            got = messages[(plan.source, r)]
            assert sorted(got) == sorted(plan.recv_blocks), (m, i, r)
            assert plans[plan.source][i].dest == r
            for b, contributors in got.items():
                assert b in holding[r], f"m={m}: block {b} arrives at rank {r} after it left"
                holding[r][b] += contributors
    for r in range(m):
        assert list(holding[r]) == [r], f"m={m}: rank {r} ends with blocks {list(holding[r])}"
        assert sorted(holding[r][r]) == list(range(m)), \
            f"m={m}: block {r} has contributions {sorted(holding[r][r])}"
    # bundled rounds: one message per round, ⌈log2 m⌉ in all, sum of block counts m - 1
    assert sum(s for _, s in spardl_block_schedule(m)) == m - 1


@pytest.mark.parametrize("m", range(1, 18))
def test_sparse_schedule_bruck_allgather_complete(m):
    held = [[r] for r in range(m)]
    for gap, items in bruck_allgather_schedule(m):
        outgoing = [list(held[(r + gap) % m][:items]) for r in range(m)]
        for r in range(m):
            held[r] += outgoing[r]
    for r in range(m):
        assert held[r] == [(r + o) % m for o in range(m)]
    assert len(bruck_allgather_schedule(m)) == ceil_log2(m)


def test_sparse_schedule_recursive_doubling():
    assert recursive_doubling_schedule(8) == [1, 2, 4]
    assert recursive_doubling_schedule(1) == []
    with pytest.raises(ValueError, match="power-of-two"):
        recursive_doubling_schedule(6)
    with pytest.raises(ValueError):
        spardl_round_plan(3, 3)
