"""The cyclic ring schedule (commrt.collectives.cyclic): sums, spread schedule, wire bytes."""
import pytest
from mpi_harness import run_ranks


def _rank_data(rank: int, sizes, seed: int, dtype):
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]


def _ring_worker(seed: int) -> None:
    import torch

    from commrt import transports as T
    from commrt.collectives import CyclicRing, cyclic_allreduce
    from commrt.collectives.cyclic import chunk_bounds, expected_wire_bytes, owned_chunk

    comm = T.world()
    P, r = comm.size, comm.rank
    # Stage sizes include fewer elements than ranks, an empty stage and an odd remainder.
    for sizes in ([37], [5, 1, 0, 130], [P * 3 + 1, 2, 64]):
        K = len(sizes)
        ref = [sum(_rank_data(q, sizes, seed, torch.float64)[i] for q in range(P))
               for i in range(K)]
        # allreduce in lockstep (a deterministic schedule), stages started at different
        # times, one advance between compute pieces
        mine = _rank_data(r, sizes, seed, torch.float64)
        before = T.wire.bytes("cyclic_allreduce")
        ring = CyclicRing(mine, comm, tag=100, lockstep=True)
        for stage in reversed(range(K)):       # like a backward pass: last stage first
            ring.start(stage)
            ring.advance()
        out = ring.finish()
        for i in range(K):
            torch.testing.assert_close(out[i], ref[i], rtol=1e-12, atol=1e-12)
            assert out[i] is mine[i]
        sent = T.wire.bytes("cyclic_allreduce") - before
        assert sent == expected_wire_bytes(sizes, 8, r, P, "allreduce"), (sent, sizes)
        assert sent == sum(t.nbytes for t in ring.schedule)
        # the schedule: every stage takes one step per advance call, consecutively, and a
        # call never carries more than one transfer of a stage
        steps = ring.steps_per_stage
        assert steps == (2 * (P - 1) if P > 1 else 0)
        for i in range(K if P > 1 else 0):
            calls = [t.advance_index for t in ring.schedule if t.stage == i]
            assert calls == list(range(calls[0], calls[0] + steps)), (i, calls)
            assert [t.step for t in ring.schedule if t.stage == i] == list(range(steps))
        if P > 1:
            per_call = ring.transfers_per_call()
            assert max(per_call.values()) <= K
            # spread: the transfers occupy at least 2(P-1) distinct advance calls
            assert len(per_call) >= steps
            first = {i: min(t.advance_index for t in ring.schedule if t.stage == i)
                     for i in range(K)}
            assert first == {i: K - 1 - i for i in range(K)}, first
        # average, non-contiguous input, float32 against MPI's own allreduce
        x = torch.randn(6, 2 * P + 1, generator=torch.Generator().manual_seed(seed + r),
                        dtype=torch.float32).t()
        expect = x.contiguous().clone()
        comm.iallreduce(expect).wait()
        got = x.clone().t().contiguous().t()   # keep it non-contiguous
        assert not got.is_contiguous()
        cyclic_allreduce(got, comm, average=True, tag=200)
        torch.testing.assert_close(got, expect / P, rtol=1e-5, atol=1e-5)

        # reduce_scatter then allgather of the owned chunks == allreduce
        mine = _rank_data(r, sizes, seed, torch.float64)
        rs = CyclicRing(mine, comm, mode="reduce_scatter", tag=300)
        rs.start()
        while rs.advance():   # non-blocking: a stage moves at most one step per call
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

    # wait_stage drives every started stage, and the peak in-flight bytes are tracked
    a, b = torch.ones(10, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ring = CyclicRing([a, b], comm, tag=500)
    ring.start([0, 1])
    ring.wait_stage(1)
    assert ring.stage_done(0) and ring.stage_done(1)
    assert torch.equal(a, torch.full((10,), float(P), dtype=torch.float64))
    if P > 1:
        assert 0 < ring.peak_in_flight_bytes <= 8 * (10 + 3)

    # bad configuration
    for bad, match in ((lambda: CyclicRing([a], comm, mode="tree"), "unknown ring mode"),
                       (lambda: CyclicRing([], comm), "at least one"),
                       (lambda: CyclicRing([a] * 40000, comm, tag=1), "tag"),
                       (lambda: CyclicRing([a], comm).start(3), "out of range")):
        try:
            bad()
        except ValueError as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"no ValueError for {match}")


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_cyclic_ring_sum_schedule_bytes(nprocs):
    run_ranks(_ring_worker, nprocs, timeout=240, seed=nprocs)
