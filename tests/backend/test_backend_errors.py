"""Bad input on the `commrt` backend: a clear ValueError/RuntimeError naming the problem on
every rank (never a hang, never silent corruption), and an uncaught exception on one rank
ending the whole job fast."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from _backend_util import init_commrt
from mpi_harness import run_ranks


def _expect_error(fn, kinds, *needles: str) -> str:
    """Run fn; it must raise one of `kinds` whose message contains every needle."""
    try:
        fn()
    except kinds as exc:
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        if missing:
            raise AssertionError(f"error message {msg!r} lacks {missing}") from exc
        return msg
    raise AssertionError(f"expected {kinds} with {needles}, nothing was raised")


def _check_still_works(P: int, group=None) -> None:
    """After an error every rank is still in step: a collective gives the right answer."""
    t = torch.ones(3)
    dist.all_reduce(t, group=group)
    if not torch.equal(t, torch.full((3,), float(P))):
        raise AssertionError(f"collective after an error gave {t}")


def _errors_worker(detail: bool) -> None:
    """Every mistake raises on every rank. Under TORCH_DISTRIBUTED_DEBUG=DETAIL the ranks
    agree before posting, so the group stays usable after any error. In the default mode
    the check travels beside the data: after a mistake made by some ranks only (or a
    disagreement) the group refuses further work with a RuntimeError on every rank, while a
    mistake every rank makes leaves it usable; so each case runs on a fresh group."""
    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    bad = rank == P - 1  # the one rank that makes each mistake
    partial = P > 1      # whether the mistake is made on some ranks only

    def case(fn, kinds, needles, on_some_ranks: bool) -> str:
        group = None if detail else dist.new_group()
        msg = _expect_error(lambda: fn(group), kinds, *needles)
        if detail or not on_some_ranks:
            _check_still_works(P, group)
        else:
            _expect_error(lambda: dist.all_reduce(torch.ones(1), group=group), RuntimeError,
                          "unusable")
            _check_still_works(P)
        return msg

    if P > 1:
        # shapes differ across ranks: every rank raises, naming the disagreement
        case(lambda g: dist.all_reduce(torch.ones(4 + bad), group=g), ValueError,
             ("all_reduce", "disagree"), True)
        # dtypes differ across ranks
        case(lambda g: dist.broadcast(torch.ones(4, dtype=torch.float64 if bad else
                                                 torch.float32), src=0, group=g),
             ValueError, ("broadcast", "disagree"), True)
        # the ranks call different collectives
        case(lambda g: dist.broadcast(torch.ones(4), src=0, group=g) if bad else
             dist.all_reduce(torch.ones(4), group=g), ValueError, ("disagree",), True)
    # all_gather_into_tensor with a wrong output size on one rank: that rank names the sizes,
    # the others learn that a rank rejected its arguments
    out = torch.empty(P * 2 + bad)
    msg = case(lambda g: dist.all_gather_into_tensor(out, torch.ones(2), group=g), ValueError,
               ("all_gather_into_tensor",), partial)
    if bad and "expected world size" not in msg or not bad and "another rank" not in msg:
        raise AssertionError(f"all_gather_into_tensor error: {msg}")
    # a tensor on an unsupported device on one rank
    msg = case(lambda g: dist.all_reduce(torch.ones(2, device="meta" if bad else "cpu"),
                                         group=g), ValueError, ("all_reduce",), partial)
    if bad and "meta" not in msg or not bad and "another rank" not in msg:
        raise AssertionError(f"device error: {msg}")
    # all_to_all_single splits that do not add up to the input on one rank
    inp = torch.arange(float(P * 2))
    splits = [2] * P
    if bad:
        splits[0] = 3
    case(lambda g: dist.all_to_all_single(torch.empty(P * 2), inp, [2] * P, splits, group=g),
         ValueError, ("all_to_all_single",), partial)
    # splits consistent on every rank but not with each other: rank 0 expects 3 rows from
    # the last rank, which sends it 2
    if P > 1:
        recv = [2] * P
        if rank == 0:
            recv[P - 1] = 3
        case(lambda g: dist.all_to_all_single(torch.empty(sum(recv)), inp, recv, [2] * P,
                                              group=g),
             ValueError, ("do not add up", f"rank {P - 1} sends 2 elements to rank 0"), True)
    # AVG of integers and bitwise ops on floats are refused (on every rank)
    case(lambda g: dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.AVG,
                                   group=g), ValueError, ("AVG",), False)
    case(lambda g: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BXOR, group=g), ValueError,
         ("BXOR",), False)
    # a tensor on an unsupported device, every rank
    case(lambda g: dist.all_reduce(torch.ones(2, device="meta"), group=g), ValueError,
         ("meta", "cpu"), False)
    # destination / source rank out of range (torch or commrt catches it; both are clear)
    _expect_error(lambda: dist.send(torch.ones(1), dst=P + 3), (ValueError, RuntimeError),
                  str(P + 3))
    _expect_error(lambda: dist.broadcast(torch.ones(1), group_src=P), (ValueError, RuntimeError),
                  str(P))
    # a message of the wrong size is an error on the receiver, not a partial fill
    if P > 1:
        if rank == 0:
            dist.send(torch.ones(2), dst=1)
        elif rank == 1:
            _expect_error(lambda: dist.recv(torch.empty(3), src=0), RuntimeError, "received 8 bytes")
    _check_still_works(P)
    dist.destroy_process_group()


@pytest.mark.parametrize("detail", [False, True], ids=["default", "detail"])
@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_backend_errors(nprocs: int, detail: bool) -> None:
    env = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL" if detail else "OFF"}
    run_ranks(_errors_worker, nprocs, timeout=180, env=env, detail=detail)


def _crash_worker() -> None:
    init_commrt()
    if dist.get_rank() == 1:
        time.sleep(1.0)
        raise RuntimeError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(4))  # the other ranks wait here for rank 1, forever
    dist.barrier()


def test_backend_exception_ends_job() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_crash_worker, 3, timeout=120)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "failed (exit" in text, text  # ended by the abort, not by the harness's timeout
    assert "deliberate failure on rank 1" in text
    assert elapsed < 100, elapsed
