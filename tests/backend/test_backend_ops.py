"""Every torch.distributed collective on the `commrt` backend, every dtype, against a
single-process reference (float64/int64) of the ranks' inputs; sync, async+wait() and
async+get_future(); non-contiguous inputs; object collectives; the *_coalesced variants.

One launch per world size (1 to 5 ranks) runs every check below; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and one pytest test per (world size, check) reads it.
Inputs are fresh per launch (`rank_input` from the launch's seed, printed on failure).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from backend_util import ALL_DTYPES, FLOAT_DTYPES, assert_close, init_commrt, rank_input
from harness import assert_check, checks_fixture, run_checks

WORLD_SIZES = [1, 2, 3, 4, 5]

R = dist.ReduceOp


def _reference(inputs: list[torch.Tensor], op, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        stack = torch.stack([t.to(torch.int64) for t in inputs])
        if op in (R.SUM, R.MAX, R.BOR):
            return stack.amax(0).bool()
        if op in (R.MIN, R.PRODUCT, R.BAND):
            return stack.amin(0).bool()
        return (stack.sum(0) % 2).bool()  # BXOR
    wide = torch.float64 if dtype.is_floating_point else torch.int64
    stack = torch.stack([t.to(wide) for t in inputs])
    if op == R.SUM:
        out = stack.sum(0)
    elif op == R.AVG:
        out = stack.sum(0) / len(inputs)
    elif op == R.MAX:
        out = stack.amax(0)
    elif op == R.MIN:
        out = stack.amin(0)
    elif op == R.PRODUCT:
        out = stack.prod(0)
    else:
        fn = {R.BAND: torch.bitwise_and, R.BOR: torch.bitwise_or, R.BXOR: torch.bitwise_xor}[op]
        out = functools.reduce(fn, list(stack))
    return out.to(dtype)


def _ops_for(dtype: torch.dtype) -> list:
    if dtype.is_floating_point:
        return [R.SUM, R.AVG, R.MAX, R.MIN, R.PRODUCT]
    return [R.SUM, R.MAX, R.MIN, R.PRODUCT, R.BAND, R.BOR, R.BXOR]


def _finish(work, mode: str, expected_result: list | None = None) -> None:
    """Complete an async op the way `mode` says and check what its future returns."""
    if mode == "sync":
        if work is not None:
            raise AssertionError("a synchronous collective returned a Work")
        return
    if mode == "wait":
        if work.wait() is not True:
            raise AssertionError("Work.wait() did not return True")
        return
    value = work.get_future().wait()
    if expected_result is not None:
        if len(value) != len(expected_result) or any(
                v is not e for v, e in zip(value, expected_result)):
            raise AssertionError("the future's value is not the op's output tensors")


ASYNC_DTYPES = [torch.float32, torch.bfloat16, torch.int32, torch.bool]
MODES = ("sync", "wait", "future")


def _every_mode(check):
    """Run ``check(seed, rank, P, mode, dtype, tag)`` synchronously for every dtype and
    asynchronously (completed by wait() and by get_future()) for a representative subset
    (time budget)."""
    def run(seed: int) -> None:
        rank, P = dist.get_rank(), dist.get_world_size()
        for mode in MODES:
            for dtype in ALL_DTYPES if mode == "sync" else ASYNC_DTYPES:
                check(seed, rank, P, mode, dtype, f"{mode}/{dtype}")
    run.__doc__ = check.__doc__
    return run


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding t's values (every other element of a larger buffer)."""
    base = torch.zeros(t.numel(), 2, dtype=t.dtype)
    base[:, 0] = t.reshape(-1)
    view = base[:, 0]
    assert not view.is_contiguous()
    return view


@_every_mode
def _check_all_reduce(seed, rank, P, mode, dtype, tag):
    """Every reduction (product on small values so it stays exact)."""
    ops = _ops_for(dtype) if dtype != torch.bool else [R.SUM, R.MAX, R.MIN, R.PRODUCT,
                                                          R.BAND, R.BOR, R.BXOR]
    for op in ops:
        case = f"ar{op}{tag}"
        ins = [rank_input(seed, r, case, (7,), dtype, op == R.PRODUCT) for r in range(P)]
        t = ins[rank].clone()
        work = dist.all_reduce(t, op=op, async_op=mode != "sync")
        _finish(work, mode, [t])
        assert_close(t, _reference(ins, op, dtype), f"all_reduce {op} {tag}")


@_every_mode
def _check_all_reduce_noncontiguous(seed, rank, P, mode, dtype, tag):
    """all_reduce on a non-contiguous view: the view is reduced, its neighbours kept."""
    ins = [rank_input(seed, r, f"nc{tag}", (7,), dtype) for r in range(P)]
    view = _noncontig(ins[rank])
    _finish(dist.all_reduce(view, op=R.MAX, async_op=mode != "sync"), mode)
    assert_close(view, _reference(ins, R.MAX, dtype), f"non-contiguous all_reduce {tag}")
    assert_close(view._base[:, 1], torch.zeros(7, dtype=dtype), "neighbour column")


@_every_mode
def _check_broadcast(seed, rank, P, mode, dtype, tag):
    """Broadcast from the last rank."""
    root = P - 1
    t = rank_input(seed, rank, f"bc{tag}", (3, 2), dtype)
    expected = rank_input(seed, root, f"bc{tag}", (3, 2), dtype)
    _finish(dist.broadcast(t, src=root, async_op=mode != "sync"), mode, [t])
    assert_close(t, expected, f"broadcast {tag}")


@_every_mode
def _check_reduce(seed, rank, P, mode, dtype, tag):
    """Reduce to rank 0 (SUM); non-roots keep their input."""
    ins = [rank_input(seed, r, f"rd{tag}", (7,), dtype) for r in range(P)]
    t = ins[rank].clone()
    _finish(dist.reduce(t, dst=0, op=R.SUM, async_op=mode != "sync"), mode)
    assert_close(t, _reference(ins, R.SUM, dtype) if rank == 0 else ins[rank], f"reduce {tag}")


@_every_mode
def _check_all_gather(seed, rank, P, mode, dtype, tag):
    """all_gather (list) and all_gather_into_tensor, non-contiguous input."""
    async_op = mode != "sync"
    ins = [rank_input(seed, r, f"ag{tag}", (2, 3), dtype) for r in range(P)]
    outs = [torch.empty(2, 3, dtype=dtype) for _ in range(P)]
    src = ins[rank].t().contiguous().t()  # same values, column-major strides
    _finish(dist.all_gather(outs, src, async_op=async_op), mode)
    for r in range(P):
        assert_close(outs[r], ins[r], f"all_gather slot {r} {tag}")
    flat = torch.empty(P * 2, 3, dtype=dtype)
    _finish(dist.all_gather_into_tensor(flat, src, async_op=async_op), mode, [flat])
    assert_close(flat, torch.cat(ins), f"all_gather_into_tensor {tag}")


@_every_mode
def _check_reduce_scatter(seed, rank, P, mode, dtype, tag):
    """reduce_scatter (list) and reduce_scatter_tensor, SUM (and AVG on floats)."""
    async_op = mode != "sync"
    for op in [R.SUM, R.AVG] if dtype in FLOAT_DTYPES else [R.SUM]:
        full = [rank_input(seed, r, f"rs{op}{tag}", (P * 3,), dtype) for r in range(P)]
        expected = _reference(full, op, dtype)[rank * 3:(rank + 1) * 3]
        out = torch.empty(3, dtype=dtype)
        _finish(dist.reduce_scatter_tensor(out, full[rank], op=op, async_op=async_op),
                mode, [out])
        assert_close(out, expected, f"reduce_scatter_tensor {op} {tag}")
        out2 = torch.empty(3, dtype=dtype)
        _finish(dist.reduce_scatter(out2, list(full[rank].chunk(P)), op=op,
                                    async_op=async_op), mode)
        assert_close(out2, expected, f"reduce_scatter {op} {tag}")


def _splits(src: int, dst: int) -> int:
    """Rows rank `src` sends rank `dst` in the uneven all-to-all cases."""
    return (src + dst) % 3


@_every_mode
def _check_all_to_all(seed, rank, P, mode, dtype, tag):
    """all_to_all_single with uneven splits (rank r sends (r + s) % 3 rows of width 2 to
    s) and without splits; all_to_all with a list of uneven tensors."""
    async_op = mode != "sync"
    send_rows = [_splits(rank, s) for s in range(P)]
    recv_rows = [_splits(s, rank) for s in range(P)]
    inp = rank_input(seed, rank, f"a2a{tag}", (sum(send_rows), 2), dtype)
    out = torch.empty(sum(recv_rows), 2, dtype=dtype)
    _finish(dist.all_to_all_single(out, inp, recv_rows, send_rows, async_op=async_op),
            mode, [out])
    pieces = []
    for s in range(P):
        their = rank_input(seed, s, f"a2a{tag}", (sum(_splits(s, d) for d in range(P)), 2),
                           dtype)
        start = sum(_splits(s, d) for d in range(rank))
        pieces.append(their[start:start + _splits(s, rank)])
    assert_close(out, torch.cat(pieces), f"all_to_all_single uneven {tag}")

    inp = rank_input(seed, rank, f"a2e{tag}", (P * 2,), dtype)
    out = torch.empty(P * 2, dtype=dtype)
    _finish(dist.all_to_all_single(out, inp, async_op=async_op), mode)
    expected = torch.cat([rank_input(seed, s, f"a2e{tag}", (P * 2,), dtype)[2 * rank:2 * rank + 2]
                          for s in range(P)])
    assert_close(out, expected, f"all_to_all_single even {tag}")
    ins = [rank_input(seed, rank, f"a2l{tag}{d}", (_splits(rank, d) + 1,), dtype)
           for d in range(P)]
    outs = [torch.empty(_splits(s, rank) + 1, dtype=dtype) for s in range(P)]
    _finish(dist.all_to_all(outs, ins, async_op=async_op), mode)
    for s in range(P):
        assert_close(outs[s], rank_input(seed, s, f"a2l{tag}{rank}", (_splits(s, rank) + 1,),
                                         dtype), f"all_to_all from {s} {tag}")


@_every_mode
def _check_gather_scatter(seed, rank, P, mode, dtype, tag):
    """Gather to rank P//2, scatter from rank 0."""
    async_op = mode != "sync"
    groot = P // 2
    ins = [rank_input(seed, r, f"ga{tag}", (4,), dtype) for r in range(P)]
    outs = [torch.empty(4, dtype=dtype) for _ in range(P)] if rank == groot else None
    _finish(dist.gather(ins[rank], outs, dst=groot, async_op=async_op), mode)
    if rank == groot:
        for r in range(P):
            assert_close(outs[r], ins[r], f"gather slot {r} {tag}")
    chunks = [rank_input(seed, 0, f"sc{tag}{r}", (4,), dtype) for r in range(P)]
    out = torch.empty(4, dtype=dtype)
    _finish(dist.scatter(out, chunks if rank == 0 else None, src=0, async_op=async_op), mode)
    assert_close(out, chunks[rank], f"scatter {tag}")


def _check_barrier(seed):
    for mode in MODES:
        _finish(dist.barrier(async_op=mode != "sync"), mode)


def _check_in_flight(seed):
    """Several async ops in flight at once, completed out of issue order."""
    rank, P = dist.get_rank(), dist.get_world_size()
    ins = [[rank_input(seed, r, f"multi{i}", (5,), torch.float32) for r in range(P)]
           for i in range(4)]
    ts = [ins[i][rank].clone() for i in range(4)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    futs = [works[1].get_future(), works[3].get_future()]
    works[2].wait()
    torch.futures.wait_all(futs)
    works[0].wait()
    for i in range(4):
        assert_close(ts[i], _reference(ins[i], R.SUM, torch.float32), f"in-flight op {i}")


def _check_future_callback(seed):
    """A callback chained on a future issues another collective (as DDP comm hooks do)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    t = rank_input(seed, rank, "callback", (3,), torch.float64)
    expected = 2 * P * sum(rank_input(seed, r, "callback", (3,), torch.float64)
                           for r in range(P))
    chained = dist.all_reduce(t, async_op=True).get_future().then(
        lambda fut: dist.all_reduce(fut.value()[0] * 2, async_op=True).get_future().wait()[0])
    assert_close(chained.wait(), expected, "collective inside a future callback")


def _check_objects(seed):
    """broadcast_object_list, all_gather_object (uneven pickled sizes), gather_object,
    scatter_object_list."""
    rank, P = dist.get_rank(), dist.get_world_size()
    objs = [{"rank": rank, "data": list(range(rank))}, f"from {rank}"]
    dist.broadcast_object_list(objs, src=P - 1)
    assert objs == [{"rank": P - 1, "data": list(range(P - 1))}, f"from {P - 1}"], \
        f"broadcast_object_list: {objs}"
    gathered = [None] * P
    dist.all_gather_object(gathered, ("x" * rank, rank))
    assert gathered == [("x" * r, r) for r in range(P)], f"all_gather_object: {gathered}"
    got = [None] * P if rank == 0 else None
    dist.gather_object({"r": rank}, got, dst=0)
    assert rank != 0 or got == [{"r": r} for r in range(P)], f"gather_object: {got}"
    recv = [None]
    dist.scatter_object_list(recv, [f"item{r}" for r in range(P)] if rank == 0 else None, src=0)
    assert recv == [f"item{rank}"], f"scatter_object_list: {recv}"


def _check_coalescing_manager(seed):
    """all_reduce_coalesced through the coalescing manager."""
    rank, P = dist.get_rank(), dist.get_world_size()
    ins = [[rank_input(seed, r, f"co{i}", (i + 2,), torch.float32) for r in range(P)]
           for i in range(3)]
    ts = [ins[i][rank].clone() for i in range(3)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    for i in range(3):
        assert_close(ts[i], _reference(ins[i], R.SUM, torch.float32), f"coalesced all_reduce {i}")


def _each_count(check):
    """Run ``check(seed, rank, P, shapes, dtype, tag)`` with as many inputs as ranks
    (where reading the output lists as [input][rank] instead of c10d's [rank][input] would
    still find every slot the right size) and with fewer and more inputs; float32, int64."""
    def run(seed: int) -> None:
        rank, P = dist.get_rank(), dist.get_world_size()
        for k in sorted({1, P, P + 1}):
            shapes = [(i % 3 + 1, 2) if i % 2 else (i + 2,) for i in range(k)]
            for dtype in (torch.float32, torch.int64):
                check(seed, rank, P, shapes, dtype, f"{k}/{dtype}")
    run.__doc__ = check.__doc__
    return run


@_each_count
def _check_all_gather_coalesced(seed, rank, P, shapes, dtype, tag):
    """c10d's contract: output_tensor_lists[r][i] receives rank r's input i."""
    mine = [rank_input(seed, rank, f"agc{tag}{i}", s, dtype) for i, s in enumerate(shapes)]
    outs = [[torch.full(s, -1, dtype=dtype) for s in shapes] for _ in range(P)]
    work = dist.all_gather_coalesced(outs, mine, async_op=True)
    work.wait()
    for r in range(P):
        for i, s in enumerate(shapes):
            assert_close(outs[r][i], rank_input(seed, r, f"agc{tag}{i}", s, dtype),
                         f"all_gather_coalesced [rank {r}][input {i}] {tag}")


@_each_count
def _check_all_reduce_coalesced(seed, rank, P, shapes, dtype, tag):
    """Each tensor reduced on its own."""
    ins = [[rank_input(seed, r, f"arc{tag}{i}", s, dtype) for r in range(P)]
           for i, s in enumerate(shapes)]
    ts = [ins[i][rank].clone() for i in range(len(shapes))]
    dist.all_reduce_coalesced(ts, op=R.MAX)
    for i in range(len(shapes)):
        assert_close(ts[i], _reference(ins[i], R.MAX, dtype), f"all_reduce_coalesced {i} {tag}")


@_each_count
def _check_coalesced_tensor_ops(seed, rank, P, shapes, dtype, tag):
    """all_gather_into_tensor and reduce_scatter_tensor, coalesced by the manager."""
    k = len(shapes)
    ins = [rank_input(seed, rank, f"agt{tag}{i}", (i + 1,), dtype) for i in range(k)]
    flats = [torch.empty(P * (i + 1), dtype=dtype) for i in range(k)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for flat, inp in zip(flats, ins):
            dist.all_gather_into_tensor(flat, inp)
    cm.wait()
    for i in range(k):
        assert_close(flats[i], torch.cat([rank_input(seed, r, f"agt{tag}{i}", (i + 1,), dtype)
                                          for r in range(P)]),
                     f"coalesced all_gather_into_tensor {i} {tag}")
    full = [[rank_input(seed, r, f"rst{tag}{i}", (P * (i + 1),), dtype) for r in range(P)]
            for i in range(k)]
    outs = [torch.empty(i + 1, dtype=dtype) for i in range(k)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for i in range(k):
            dist.reduce_scatter_tensor(outs[i], full[i][rank])
    cm.wait()
    for i in range(k):
        expected = _reference(full[i], R.SUM, dtype)[rank * (i + 1):(rank + 1) * (i + 1)]
        assert_close(outs[i], expected, f"coalesced reduce_scatter_tensor {i} {tag}")


CHECKS = {"all_reduce": _check_all_reduce,
          "all_reduce_noncontiguous": _check_all_reduce_noncontiguous,
          "broadcast": _check_broadcast, "reduce": _check_reduce,
          "all_gather": _check_all_gather, "reduce_scatter": _check_reduce_scatter,
          "all_to_all": _check_all_to_all, "gather_scatter": _check_gather_scatter,
          "barrier": _check_barrier, "in_flight": _check_in_flight,
          "future_callback": _check_future_callback, "objects": _check_objects,
          "coalescing_manager": _check_coalescing_manager,
          "all_gather_coalesced": _check_all_gather_coalesced,
          "all_reduce_coalesced": _check_all_reduce_coalesced,
          "coalesced_tensor_ops": _check_coalesced_tensor_ops}


def _backend_ops_worker(seed: int) -> None:
    init_commrt()
    run_checks(CHECKS, seed, rank=dist.get_rank())
    dist.destroy_process_group()


launch = checks_fixture(_backend_ops_worker, WORLD_SIZES, timeout=360)


@pytest.mark.parametrize("check", CHECKS)
def test_backend_op(launch, check):
    assert_check(launch, check)
