"""Transport collectives against a single-process float64 reference, every dtype."""
import pytest
import torch
from mpi_harness import run_ranks

DTYPES = ["float64", "float32", "float16", "bfloat16", "int8", "int16", "int32", "int64",
          "uint8", "bool"]


def _data(seed: int, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    low = 0 if dtype == torch.uint8 else -3
    return torch.randint(low, 4, (n,), generator=g).to(dtype)


def _reference(op: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """Reduction over ranks, computed in float64 (integers in int64, bools as logic)."""
    dtype = xs[0].dtype
    if dtype == torch.bool:
        stack = torch.stack(xs)
        return stack.any(0) if op in ("sum", "max", "bor") else (
            stack.all(0) if op in ("min", "product", "band") else
            (stack.sum(0) % 2).bool())
    wide = torch.stack([x.double() if dtype.is_floating_point else x.long() for x in xs])
    if op == "sum":
        out = wide.sum(0)
    elif op == "product":
        out = wide.prod(0)
    elif op == "max":
        out = wide.max(0).values
    elif op == "min":
        out = wide.min(0).values
    else:
        out = wide[0].clone()
        for x in wide[1:]:
            out = {"band": out & x, "bor": out | x, "bxor": out ^ x}[op]
    return out.to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.dtype.is_floating_point:
        tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(actual.dtype, 1e-6)
        ok = torch.allclose(actual.double(), expected.double(), rtol=tol, atol=tol)
    else:
        ok = torch.equal(actual, expected)
    if not ok:
        raise AssertionError(f"{what}: got {actual[:8]} expected {expected[:8]}")


def _collectives_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    P, me = comm.size, comm.rank
    n = 37  # not a multiple of anything
    for name in DTYPES:
        dtype = getattr(torch, name)
        xs = [_data(seed, r, n * P, dtype) for r in range(P)]
        ops = ["sum", "max", "min", "product"]
        if not dtype.is_floating_point:
            ops += ["band", "bor", "bxor"]
        for op in ops:
            if op == "product" and dtype.is_floating_point:
                xs_op = [x.clamp(-1.5, 1.5) for x in xs]  # keep the product representable
            else:
                xs_op = xs
            t = xs_op[me].clone()
            comm.iallreduce(t, op).wait()
            _close(t, _reference(op, xs_op), f"allreduce {op} {name}")
            # non-contiguous: every other element of a 2-column view
            wide = torch.stack([xs_op[me], xs_op[me]], 1)
            col = wide[:, 0]
            assert not col.is_contiguous()
            comm.iallreduce(col, op).wait()
            _close(wide[:, 0], _reference(op, xs_op), f"allreduce {op} {name} non-contiguous")
            _close(wide[:, 1], xs_op[me], "neighbouring column untouched")
        # reduce_scatter (sum) and reduce to a root
        out = torch.empty(n, dtype=dtype)
        comm.ireduce_scatter(xs[me], out, "sum" if dtype != torch.bool else "max").wait()
        full = _reference("sum" if dtype != torch.bool else "max", xs)
        _close(out, full[me * n:(me + 1) * n], f"reduce_scatter {name}")
        root = P - 1
        t = xs[me].clone()
        comm.ireduce(t, root, "max").wait()
        _close(t, _reference("max", xs) if me == root else xs[me], f"reduce {name}")
        # data movement
        t = xs[me].clone()
        comm.ibroadcast(t, 0).wait()
        _close(t, xs[0], f"broadcast {name}")
        out = torch.empty(n * P * P, dtype=dtype)
        comm.iallgather(xs[me], out).wait()
        _close(out, torch.cat(xs), f"all_gather {name}")
        counts = [r + 1 for r in range(P)]
        out = torch.empty(sum(counts), dtype=dtype)
        comm.iallgatherv(xs[me][: counts[me]], out, counts).wait()
        _close(out, torch.cat([xs[r][: counts[r]] for r in range(P)]), f"all_gatherv {name}")
        out = torch.empty(n * P, dtype=dtype)
        comm.ialltoall(xs[me], out).wait()
        _close(out, torch.cat([xs[r][me * n:(me + 1) * n] for r in range(P)]), f"alltoall {name}")
        out = torch.empty(n * P, dtype=dtype) if me == 0 else None
        comm.igather(xs[me][:n], out, 0).wait()
        if me == 0:
            _close(out, torch.cat([x[:n] for x in xs]), f"gather {name}")
        out = torch.empty(n, dtype=dtype)
        comm.iscatter(xs[me] if me == 0 else None, out, 0).wait()
        _close(out, xs[0][me * n:(me + 1) * n], f"scatter {name}")
    # uneven all-to-all: rank s sends (s + d + 1) elements to rank d
    send_counts = [me + d + 1 for d in range(P)]
    recv_counts = [s + me + 1 for s in range(P)]
    src = torch.arange(sum(send_counts), dtype=torch.float64) + 1000 * me
    out = torch.empty(sum(recv_counts), dtype=torch.float64)
    comm.ialltoallv(src, out, send_counts, recv_counts).wait()
    expected = []
    for s in range(P):
        start = sum(s + d + 1 for d in range(me))
        expected.append(torch.arange(start, start + s + me + 1, dtype=torch.float64) + 1000 * s)
    _close(out, torch.cat(expected), "alltoallv")
    # several requests in flight at once complete independently
    ts = [_data(seed + 7, me, 100, torch.float32) for _ in range(4)]
    reqs = [comm.iallreduce(t) for t in ts]
    T.wait_all(reversed(reqs))
    for i, t in enumerate(ts):
        _close(t, sum(_data(seed + 7, r, 100, torch.float32).double() for r in range(P)),
               f"concurrent allreduce {i}")
    comm.ibarrier().wait()


def _wire_bytes_worker() -> None:
    from commrt import transports as T

    comm = T.world()
    P = comm.size
    T.wire.reset()
    comm.iallreduce(torch.ones(1000, dtype=torch.float32)).wait()
    assert T.wire.bytes("all_reduce") == 2 * (P - 1) * 4000 // P
    comm.iallgather(torch.ones(10, dtype=torch.float64), torch.empty(10 * P, dtype=torch.float64)).wait()
    assert T.wire.bytes("all_gather") == (P - 1) * 80 * P // P
    comm.ireduce_scatter(torch.ones(10 * P), torch.empty(10), kind="custom").wait()
    assert T.wire.bytes("custom") == (P - 1) * 40 * P // P
    assert T.wire.messages("custom") == (1 if P > 1 else 0)  # one rank sends nothing
    # bf16 reductions travel as float32 (upcast), and are counted as such
    comm.iallreduce(torch.ones(100, dtype=torch.bfloat16), kind="half").wait()
    assert T.wire.bytes("half") == 2 * (P - 1) * 400 // P
    comm.check_uniform([1, 2, 3], "signature")  # equal on every rank: no error


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5])
def test_coll_transport_matches_reference(nprocs):
    import random
    run_ranks(_collectives_worker, nprocs, timeout=240, seed=random.randrange(1 << 20))


@pytest.mark.parametrize("nprocs", [1, 3])
def test_coll_transport_wire_bytes(nprocs):
    run_ranks(_wire_bytes_worker, nprocs)


def _checked_worker(seed: int) -> None:
    """An agreement vector posted with a collective (``check=``) travels just ahead of its
    data: equal vectors give the data's result and `agreed`; a vector that differs on one
    rank makes every rank's request settle with `agreed` False without its data; more
    checks in flight than the communicator's persistent slots still pair up in order."""
    import numpy as np

    from commrt import transports as T
    from commrt.transports.agreement import encode_signature, encode_values

    comm = T.world()
    P, rank = comm.size, comm.rank
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=g))
    signature = encode_signature(("all_reduce", n, "float32")).tobytes()
    x = _data(seed, rank, n, torch.float32)
    req = comm.iallreduce(x, check=signature).wait()
    assert req.agreed is True
    _close(x, _reference("sum", [_data(seed, r, n, torch.float32) for r in range(P)]),
           f"checked all_reduce (seed {seed})")
    if P > 1:
        # One rank's vector differs: every rank learns it, and the per-position extremes
        # name the values (ints of the vector after the flag).
        mine = encode_values([7, 100 + (rank == P - 1)]).tobytes()
        req = comm.iallreduce(torch.ones(4), check=mine).wait()
        assert req.agreed is False and not req.rejected, (rank, req.agreed)
        assert req.low == [7, 100] and req.high == [7, 101], (req.low, req.high)
        comm.barrier()  # (the data itself matched here and has completed on every rank)
    # More checks in flight than _CheckSlots.COUNT (40 unwaited), waited in reverse order.
    k = 40
    bufs = [torch.full((3,), float(rank + i)) for i in range(k)]
    reqs = [comm.iallreduce(b, check=signature) for b in bufs]
    for i in reversed(range(k)):
        reqs[i].wait()
        expect = float(sum(r + i for r in range(P)))
        assert reqs[i].agreed is True and torch.equal(bufs[i], torch.full((3,), expect)), i
    # A check with nothing to send (iagree), and a rejection flag seen by every rank.
    flagged = encode_signature(None if rank == 0 else ("x",)).tobytes()
    agree = comm.iagree(flagged).wait()
    if P > 1:
        assert agree.agreed is False and agree.rejected and not agree.all_rejected
    assert np.frombuffer(flagged, dtype=np.int64)[0] == (rank == 0)


@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_coll_transport_checked(nprocs):
    import random
    run_ranks(_checked_worker, nprocs, timeout=120, seed=random.randrange(1 << 20))


def _background_worker() -> None:
    """A request nobody waits on progresses in the background even after many later
    requests have pushed it out of the progress thread's ring of recent posts: without
    any MPI call by this thread, it completes (the progress thread tested it)."""
    import time

    from commrt import transports as T

    comm = T.world()
    big = torch.ones(1 << 20)
    pending = comm.iallreduce(big)
    for _ in range(3 * 8):  # more than the ring holds, each waited at once
        comm.iallreduce(torch.ones(4)).wait()
    deadline = time.monotonic() + 10.0
    while not pending.done and time.monotonic() < deadline:
        time.sleep(0.005)  # no MPI call from this thread
    assert pending.done, "the pushed-out request made no progress in the background"
    assert torch.equal(big, torch.full((1 << 20,), float(comm.size)))


@pytest.mark.parametrize("nprocs", [2, 3])
def test_coll_transport_background_progress(nprocs):
    run_ranks(_background_worker, nprocs, timeout=120)
