"""Transport collectives against a single-process float64 reference, every dtype.

One launch per world size (1 to 5 ranks) runs every check below; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and one pytest test per (world size, check) reads it.
Inputs are fresh per launch (its seed is printed on failure) and every rank rebuilds every
other rank's input to compute the reference in one process.
"""
import pytest
import torch
from harness import assert_check, checks_fixture, generator, run_checks

WORLD_SIZES = [1, 2, 3, 4, 5]
N = 37  # elements per rank's block: not a multiple of anything

DTYPES = ["float64", "float32", "float16", "bfloat16", "int8", "int16", "int32", "int64",
          "uint8", "bool"]


def _data(seed: int, case: str, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input for `case`: the same on every rank, fresh per seed."""
    g = generator(seed, case, str(dtype), rank)
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


def _all_ranks(comm, seed: int, case: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's input of `case` (N·P elements each)."""
    return [_data(seed, case, r, N * comm.size, dtype) for r in range(comm.size)]


def _each_dtype(check):
    """Run ``check(comm, seed, dtype, name)`` for every dtype of DTYPES."""
    def run(comm, seed: int) -> None:
        for name in DTYPES:
            check(comm, seed, getattr(torch, name), name)
    run.__doc__ = check.__doc__
    return run


@_each_dtype
def _check_allreduce(comm, seed, dtype, name):
    """Every reduction (bitwise ones on integers and bools), contiguous and on a strided
    view whose neighbouring column must stay untouched."""
    xs = _all_ranks(comm, seed, "allreduce", dtype)
    ops = ["sum", "max", "min", "product"]
    if not dtype.is_floating_point:
        ops += ["band", "bor", "bxor"]
    for op in ops:
        if op == "product" and dtype.is_floating_point:
            xs_op = [x.clamp(-1.5, 1.5) for x in xs]  # keep the product representable
        else:
            xs_op = xs
        t = xs_op[comm.rank].clone()
        comm.iallreduce(t, op).wait()
        _close(t, _reference(op, xs_op), f"allreduce {op} {name}")
        # non-contiguous: every other element of a 2-column view
        wide = torch.stack([xs_op[comm.rank], xs_op[comm.rank]], 1)
        col = wide[:, 0]
        assert not col.is_contiguous()
        comm.iallreduce(col, op).wait()
        _close(wide[:, 0], _reference(op, xs_op), f"allreduce {op} {name} non-contiguous")
        _close(wide[:, 1], xs_op[comm.rank], "neighbouring column untouched")


@_each_dtype
def _check_reduce_scatter(comm, seed, dtype, name):
    xs, me = _all_ranks(comm, seed, "reduce_scatter", dtype), comm.rank
    op = "sum" if dtype != torch.bool else "max"
    out = torch.empty(N, dtype=dtype)
    comm.ireduce_scatter(xs[me], out, op).wait()
    _close(out, _reference(op, xs)[me * N:(me + 1) * N], f"reduce_scatter {name}")


@_each_dtype
def _check_reduce(comm, seed, dtype, name):
    """max to the last rank; the others keep their input."""
    xs, me, root = _all_ranks(comm, seed, "reduce", dtype), comm.rank, comm.size - 1
    t = xs[me].clone()
    comm.ireduce(t, root, "max").wait()
    _close(t, _reference("max", xs) if me == root else xs[me], f"reduce {name}")


@_each_dtype
def _check_broadcast(comm, seed, dtype, name):
    xs = _all_ranks(comm, seed, "broadcast", dtype)
    t = xs[comm.rank].clone()
    comm.ibroadcast(t, 0).wait()
    _close(t, xs[0], f"broadcast {name}")


@_each_dtype
def _check_all_gather(comm, seed, dtype, name):
    xs, P = _all_ranks(comm, seed, "all_gather", dtype), comm.size
    out = torch.empty(N * P * P, dtype=dtype)
    comm.iallgather(xs[comm.rank], out).wait()
    _close(out, torch.cat(xs), f"all_gather {name}")


@_each_dtype
def _check_all_gatherv(comm, seed, dtype, name):
    """Rank r contributes r + 1 elements."""
    xs, P = _all_ranks(comm, seed, "all_gatherv", dtype), comm.size
    counts = [r + 1 for r in range(P)]
    out = torch.empty(sum(counts), dtype=dtype)
    comm.iallgatherv(xs[comm.rank][: counts[comm.rank]], out, counts).wait()
    _close(out, torch.cat([xs[r][: counts[r]] for r in range(P)]), f"all_gatherv {name}")


@_each_dtype
def _check_alltoall(comm, seed, dtype, name):
    xs, P, me = _all_ranks(comm, seed, "alltoall", dtype), comm.size, comm.rank
    out = torch.empty(N * P, dtype=dtype)
    comm.ialltoall(xs[me], out).wait()
    _close(out, torch.cat([xs[r][me * N:(me + 1) * N] for r in range(P)]), f"alltoall {name}")


@_each_dtype
def _check_gather(comm, seed, dtype, name):
    xs, P, me = _all_ranks(comm, seed, "gather", dtype), comm.size, comm.rank
    out = torch.empty(N * P, dtype=dtype) if me == 0 else None
    comm.igather(xs[me][:N], out, 0).wait()
    if me == 0:
        _close(out, torch.cat([x[:N] for x in xs]), f"gather {name}")


@_each_dtype
def _check_scatter(comm, seed, dtype, name):
    xs, me = _all_ranks(comm, seed, "scatter", dtype), comm.rank
    out = torch.empty(N, dtype=dtype)
    comm.iscatter(xs[me] if me == 0 else None, out, 0).wait()
    _close(out, xs[0][me * N:(me + 1) * N], f"scatter {name}")


def _check_alltoallv(comm, seed):
    """Uneven all-to-all: rank s sends (s + d + 1) elements to rank d."""
    P, me = comm.size, comm.rank
    send_counts = [me + d + 1 for d in range(P)]
    recv_counts = [s + me + 1 for s in range(P)]
    xs = [_data(seed, "alltoallv", r, sum(r + d + 1 for d in range(P)), torch.float64)
          for r in range(P)]
    out = torch.empty(sum(recv_counts), dtype=torch.float64)
    comm.ialltoallv(xs[me], out, send_counts, recv_counts).wait()
    expected = []
    for s in range(P):
        start = sum(s + d + 1 for d in range(me))
        expected.append(xs[s][start:start + s + me + 1])
    _close(out, torch.cat(expected), "alltoallv")


def _check_concurrent(comm, seed):
    """Several requests in flight at once complete independently, waited in reverse."""
    from commrt import transports as T

    P, me = comm.size, comm.rank
    ts = [_data(seed, f"concurrent{i}", me, 100, torch.float32) for i in range(4)]
    reqs = [comm.iallreduce(t) for t in ts]
    T.wait_all(reversed(reqs))
    for i, t in enumerate(ts):
        _close(t, sum(_data(seed, f"concurrent{i}", r, 100, torch.float32).double()
                      for r in range(P)), f"concurrent allreduce {i}")
    comm.ibarrier().wait()


def _check_wire_bytes(comm, seed):
    """The transport's counters: each collective's per-rank bytes by its formula."""
    from commrt import transports as T

    P = comm.size
    T.wire.reset()
    comm.iallreduce(torch.ones(1000, dtype=torch.float32)).wait()
    assert T.wire.bytes("all_reduce") == 2 * (P - 1) * 4000 // P
    comm.iallgather(torch.ones(10, dtype=torch.float64),
                    torch.empty(10 * P, dtype=torch.float64)).wait()
    assert T.wire.bytes("all_gather") == (P - 1) * 80 * P // P
    comm.ireduce_scatter(torch.ones(10 * P), torch.empty(10), kind="custom").wait()
    assert T.wire.bytes("custom") == (P - 1) * 40 * P // P
    assert T.wire.messages("custom") == (1 if P > 1 else 0)  # one rank sends nothing
    # bf16 reductions travel as float32 (upcast), and are counted as such
    comm.iallreduce(torch.ones(100, dtype=torch.bfloat16), kind="half").wait()
    assert T.wire.bytes("half") == 2 * (P - 1) * 400 // P
    comm.check_uniform([1, 2, 3], "signature")  # equal on every rank: no error


def _check_checked(comm, seed):
    """An agreement vector posted with a collective (``check=``) travels just ahead of its
    data: equal vectors give the data's result and `agreed`; a vector that differs on one
    rank makes every rank's request settle with `agreed` False without its data; more
    checks in flight than the communicator's persistent slots still pair up in order."""
    import numpy as np

    from commrt.transports.agreement import encode_signature, encode_values

    P, rank = comm.size, comm.rank
    n = int(torch.randint(1, 300, (1,), generator=generator(seed, "checked size")))
    signature = encode_signature(("all_reduce", n, "float32")).tobytes()
    x = _data(seed, "checked", rank, n, torch.float32)
    req = comm.iallreduce(x, check=signature).wait()
    assert req.agreed is True
    _close(x, _reference("sum", [_data(seed, "checked", r, n, torch.float32)
                                 for r in range(P)]), f"checked all_reduce (n={n})")
    if P > 1:
        # One rank's vector differs: every rank learns it, and the per-position extremes
        # name the values (ints of the vector after the flag).
        mine = encode_values([7, 100 + (rank == P - 1)]).tobytes()
        req = comm.iallreduce(torch.ones(4), check=mine).wait()
        assert req.agreed is False and not req.rejected, (rank, req.agreed)
        assert req.low == [7, 100] and req.high == [7, 101], (req.low, req.high)
        comm.barrier()  # (the data itself matched here and has completed on every rank)
    # More checks in flight than CheckSlots.COUNT (40 unwaited), waited in reverse order.
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


def _check_background(comm, seed):
    """A request nobody waits on progresses in the background even after many later
    requests have pushed it out of the progress thread's ring of recent posts: without
    any MPI call by this thread, it completes (the progress thread tested it)."""
    import time

    big = torch.ones(1 << 20)
    pending = comm.iallreduce(big)
    for _ in range(3 * 8):  # more than the ring holds, each waited at once
        comm.iallreduce(torch.ones(4)).wait()
    deadline = time.monotonic() + 10.0
    while not pending.done and time.monotonic() < deadline:
        time.sleep(0.005)  # no MPI call from this thread
    assert pending.done, "the pushed-out request made no progress in the background"
    assert torch.equal(big, torch.full((1 << 20,), float(comm.size)))


CHECKS = {"allreduce": _check_allreduce, "reduce_scatter": _check_reduce_scatter,
          "reduce": _check_reduce, "broadcast": _check_broadcast,
          "all_gather": _check_all_gather, "all_gatherv": _check_all_gatherv,
          "alltoall": _check_alltoall, "gather": _check_gather, "scatter": _check_scatter,
          "alltoallv": _check_alltoallv, "concurrent": _check_concurrent,
          "wire_bytes": _check_wire_bytes, "checked": _check_checked,
          "background": _check_background}


def _transport_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks(CHECKS, comm, seed, rank=comm.rank)


launch = checks_fixture(_transport_worker, WORLD_SIZES, timeout=300)


@pytest.mark.parametrize("check", CHECKS)
def test_transport_collective(launch, check):
    assert_check(launch, check)
