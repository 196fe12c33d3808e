"""The cyclic ring schedule (commrt.collectives.cyclic): sums, spread schedule, wire bytes.

One launch per world size (2 to 4 ranks) runs every check below; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and one pytest test per (world size, check) reads it.
Inputs are fresh per launch (its seed is printed on failure); the reference is the sum
of every rank's input, rebuilt in one process in float64.
"""
import pytest
import torch
from harness import assert_check, checks_fixture, generator, run_checks

WORLD_SIZES = [2, 3, 4]


def _stage_sizes(P: int) -> list[list[int]]:
    """Stage sizes with fewer elements than ranks, an empty stage and an odd remainder."""
    return [[37], [5, 1, 0, 130], [P * 3 + 1, 2, 64]]


def _rank_data(seed: int, rank: int, sizes, dtype=torch.float64):
    g = generator(seed, "stages", sizes, rank)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]


def _reference(seed: int, P: int, sizes) -> list[torch.Tensor]:
    return [sum(_rank_data(seed, q, sizes)[i] for q in range(P)) for i in range(len(sizes))]


def _check_lockstep_allreduce(comm, seed):
    """Allreduce in lockstep (a deterministic schedule), stages started at different times
    (last stage first, like a backward pass), one advance between compute pieces: the sums,
    the bytes sent, and the schedule (every stage takes one step per advance call,
    consecutively; a call never carries more than one transfer of a stage; the transfers
    spread over at least 2(P-1) calls)."""
    from commrt import transports as T
    from commrt.collectives import CyclicRing
    from commrt.collectives.cyclic import expected_wire_bytes

    P, r = comm.size, comm.rank
    for sizes in _stage_sizes(P):
        K = len(sizes)
        ref = _reference(seed, P, sizes)
        mine = _rank_data(seed, r, sizes)
        before = T.wire.bytes("cyclic_allreduce")
        ring = CyclicRing(mine, comm, tag=100, lockstep=True)
        for stage in reversed(range(K)):
            ring.start(stage)
            ring.advance()
        out = ring.finish()
        for i in range(K):
            torch.testing.assert_close(out[i], ref[i], rtol=1e-12, atol=1e-12)
            assert out[i] is mine[i]
        sent = T.wire.bytes("cyclic_allreduce") - before
        assert sent == expected_wire_bytes(sizes, 8, r, P, "allreduce"), (sent, sizes)
        assert sent == sum(t.nbytes for t in ring.schedule)
        steps = ring.steps_per_stage
        assert steps == 2 * (P - 1)
        for i in range(K):
            calls = [t.advance_index for t in ring.schedule if t.stage == i]
            assert calls == list(range(calls[0], calls[0] + steps)), (i, calls)
            assert [t.step for t in ring.schedule if t.stage == i] == list(range(steps))
        per_call = ring.transfers_per_call()
        assert max(per_call.values()) <= K
        assert len(per_call) >= steps
        first = {i: min(t.advance_index for t in ring.schedule if t.stage == i)
                 for i in range(K)}
        assert first == {i: K - 1 - i for i in range(K)}, first


def _check_average_noncontiguous(comm, seed):
    """Average of a non-contiguous float32 input against MPI's own allreduce."""
    from commrt.collectives import cyclic_allreduce

    P = comm.size
    x = torch.randn(6, 2 * P + 1, generator=generator(seed, "average", comm.rank),
                    dtype=torch.float32).t()
    expect = x.contiguous().clone()
    comm.iallreduce(expect).wait()
    got = x.clone().t().contiguous().t()   # keep it non-contiguous
    assert not got.is_contiguous()
    cyclic_allreduce(got, comm, average=True, tag=200)
    torch.testing.assert_close(got, expect / P, rtol=1e-5, atol=1e-5)


def _check_reduce_scatter_allgather(comm, seed):
    """reduce_scatter (non-blocking: a stage moves at most one step per call) then
    allgather of the owned chunks == allreduce, with the allgather's bytes."""
    from commrt import transports as T
    from commrt.collectives import CyclicRing
    from commrt.collectives.cyclic import chunk_bounds, expected_wire_bytes, owned_chunk

    P, r = comm.size, comm.rank
    for sizes in _stage_sizes(P):
        K = len(sizes)
        ref = _reference(seed, P, sizes)
        mine = _rank_data(seed, r, sizes)
        rs = CyclicRing(mine, comm, mode="reduce_scatter", tag=300)
        rs.start()
        while rs.advance():
            pass
        for i in range(K):
            calls = [t.advance_index for t in rs.schedule if t.stage == i]
            assert all(a < b for a, b in zip(calls, calls[1:])), calls
        for i in range(K):
            a, b = chunk_bounds(sizes[i], P)[owned_chunk(r, P)]
            torch.testing.assert_close(mine[i][a:b], ref[i][a:b], rtol=1e-12, atol=1e-12)
        before = T.wire.bytes("cyclic_allgather")
        ag = CyclicRing(mine, comm, mode="allgather", tag=400)
        ag.finish()
        for i in range(K):
            torch.testing.assert_close(mine[i], ref[i], rtol=1e-12, atol=1e-12)
        assert T.wire.bytes("cyclic_allgather") - before == expected_wire_bytes(
            sizes, 8, r, P, "allgather")
        assert len(rs.schedule) == K * (P - 1) and len(ag.schedule) == K * (P - 1)


def _check_wait_stage(comm, seed):
    """wait_stage drives every started stage, and the peak in-flight bytes are tracked."""
    from commrt.collectives import CyclicRing

    P = comm.size
    a, b = torch.ones(10, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ring = CyclicRing([a, b], comm, tag=500)
    ring.start([0, 1])
    ring.wait_stage(1)
    assert ring.stage_done(0) and ring.stage_done(1)
    assert torch.equal(a, torch.full((10,), float(P), dtype=torch.float64))
    assert 0 < ring.peak_in_flight_bytes <= 8 * (10 + 3)


def _check_bad_config(comm, seed):
    from commrt.collectives import CyclicRing

    a = torch.ones(10, dtype=torch.float64)
    for bad, match in ((lambda: CyclicRing([a], comm, mode="tree"), "unknown ring mode"),
                       (lambda: CyclicRing([], comm), "at least one"),
                       (lambda: CyclicRing([a] * 40000, comm, tag=1), "tag"),
                       (lambda: CyclicRing([a], comm).start(3), "out of range")):
        with pytest.raises(ValueError, match=match):
            bad()


CHECKS = {"lockstep_allreduce": _check_lockstep_allreduce,
          "average_noncontiguous": _check_average_noncontiguous,
          "reduce_scatter_allgather": _check_reduce_scatter_allgather,
          "wait_stage": _check_wait_stage, "bad_config": _check_bad_config}


def _ring_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks(CHECKS, comm, seed, rank=comm.rank)


launch = checks_fixture(_ring_worker, WORLD_SIZES, timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_cyclic_ring(launch, check):
    assert_check(launch, check)
