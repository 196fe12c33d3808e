"""Bad input on the `commrt` backend: a clear ValueError/RuntimeError naming the problem on
every rank (never a hang, never silent corruption), and an uncaught exception on one rank
ending the whole job fast.

One launch per world size (1 to 3 ranks) and debug mode (default, and
TORCH_DISTRIBUTED_DEBUG=DETAIL) runs every mistake below as a check; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and one pytest test per (launch, mistake) reads it.

Under DETAIL the ranks agree before posting, so the group stays usable after any error.
In the default mode the check travels beside the data: after a mistake made by some ranks
only (or a disagreement) the group refuses further work with a RuntimeError on every
rank, while a mistake every rank makes leaves it usable; so each case runs on a fresh
group there."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from backend_util import init_commrt
from harness import assert_check, checks_fixture, run_checks, run_ranks

WORLD_SIZES = [1, 2, 3]
MODES = {"default": {"TORCH_DISTRIBUTED_DEBUG": "OFF"},
         "detail": {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}}


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


def _assert_still_works(P: int, group=None) -> None:
    """After an error every rank is still in step: a collective gives the right answer."""
    t = torch.ones(3)
    dist.all_reduce(t, group=group)
    if not torch.equal(t, torch.full((3,), float(P))):
        raise AssertionError(f"collective after an error gave {t}")


def _ranks() -> tuple[int, int, bool, bool]:
    """(rank, P, whether this is the one rank making a mistake, whether the mistake is
    made on some ranks only)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    return rank, P, rank == P - 1, P > 1


def _case(fn, kinds, needles, on_some_ranks: bool) -> str:
    """``fn(group)`` must raise one of `kinds` naming every needle on every rank; then the
    group is usable (DETAIL, or a mistake every rank made) or refuses further work."""
    detail = os.environ.get("TORCH_DISTRIBUTED_DEBUG") == "DETAIL"
    P = dist.get_world_size()
    group = None if detail else dist.new_group()
    msg = _expect_error(lambda: fn(group), kinds, *needles)
    if detail or not on_some_ranks:
        _assert_still_works(P, group)
    else:
        _expect_error(lambda: dist.all_reduce(torch.ones(1), group=group), RuntimeError,
                      "unusable")
        _assert_still_works(P)
    return msg


def _check_shapes_disagree():
    """Shapes differ across ranks: every rank raises, naming the disagreement."""
    _, P, bad, _ = _ranks()
    if P > 1:
        _case(lambda g: dist.all_reduce(torch.ones(4 + bad), group=g), ValueError,
              ("all_reduce", "disagree"), True)


def _check_dtypes_disagree():
    _, P, bad, _ = _ranks()
    if P > 1:
        _case(lambda g: dist.broadcast(torch.ones(4, dtype=torch.float64 if bad else
                                                  torch.float32), src=0, group=g),
              ValueError, ("broadcast", "disagree"), True)


def _check_collectives_disagree():
    """The ranks call different collectives."""
    _, P, bad, _ = _ranks()
    if P > 1:
        _case(lambda g: dist.broadcast(torch.ones(4), src=0, group=g) if bad else
              dist.all_reduce(torch.ones(4), group=g), ValueError, ("disagree",), True)


def _check_output_size():
    """all_gather_into_tensor with a wrong output size on one rank: that rank names the
    sizes, the others learn that a rank rejected its arguments."""
    _, P, bad, partial = _ranks()
    out = torch.empty(P * 2 + bad)
    msg = _case(lambda g: dist.all_gather_into_tensor(out, torch.ones(2), group=g), ValueError,
                ("all_gather_into_tensor",), partial)
    assert "expected world size" in msg if bad else "another rank" in msg, \
        f"all_gather_into_tensor error: {msg}"


def _check_device_one_rank():
    """A tensor on an unsupported device on one rank."""
    _, _, bad, partial = _ranks()
    msg = _case(lambda g: dist.all_reduce(torch.ones(2, device="meta" if bad else "cpu"),
                                          group=g), ValueError, ("all_reduce",), partial)
    assert "meta" in msg if bad else "another rank" in msg, f"device error: {msg}"


def _check_splits_one_rank():
    """all_to_all_single splits that do not add up to the input on one rank."""
    _, P, bad, partial = _ranks()
    inp = torch.arange(float(P * 2))
    splits = [2] * P
    if bad:
        splits[0] = 3
    _case(lambda g: dist.all_to_all_single(torch.empty(P * 2), inp, [2] * P, splits, group=g),
          ValueError, ("all_to_all_single",), partial)


def _check_splits_mismatch():
    """Splits consistent on every rank but not with each other: rank 0 expects 3 rows
    from the last rank, which sends it 2."""
    rank, P, _, _ = _ranks()
    if P > 1:
        inp = torch.arange(float(P * 2))
        recv = [2] * P
        if rank == 0:
            recv[P - 1] = 3
        _case(lambda g: dist.all_to_all_single(torch.empty(sum(recv)), inp, recv, [2] * P,
                                               group=g),
              ValueError, ("do not add up", f"rank {P - 1} sends 2 elements to rank 0"), True)


def _check_op_for_dtype():
    """AVG of integers and bitwise ops on floats are refused (on every rank)."""
    _case(lambda g: dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.AVG,
                                    group=g), ValueError, ("AVG",), False)
    _case(lambda g: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BXOR, group=g), ValueError,
          ("BXOR",), False)


def _check_device_every_rank():
    _case(lambda g: dist.all_reduce(torch.ones(2, device="meta"), group=g), ValueError,
          ("meta", "cpu"), False)


def _check_rank_out_of_range():
    """Destination / source rank out of range (torch or commrt catches it; both clear)."""
    P = dist.get_world_size()
    _expect_error(lambda: dist.send(torch.ones(1), dst=P + 3), (ValueError, RuntimeError),
                  str(P + 3))
    _expect_error(lambda: dist.broadcast(torch.ones(1), group_src=P), (ValueError, RuntimeError),
                  str(P))


def _check_message_size():
    """A message of the wrong size is an error on the receiver, not a partial fill."""
    rank, P, _, _ = _ranks()
    if P > 1:
        if rank == 0:
            dist.send(torch.ones(2), dst=1)
        elif rank == 1:
            _expect_error(lambda: dist.recv(torch.empty(3), src=0), RuntimeError,
                          "received 8 bytes")
    _assert_still_works(P)


CHECKS = {"shapes_disagree": _check_shapes_disagree, "dtypes_disagree": _check_dtypes_disagree,
          "collectives_disagree": _check_collectives_disagree,
          "output_size": _check_output_size, "device_one_rank": _check_device_one_rank,
          "splits_one_rank": _check_splits_one_rank, "splits_mismatch": _check_splits_mismatch,
          "op_for_dtype": _check_op_for_dtype, "device_every_rank": _check_device_every_rank,
          "rank_out_of_range": _check_rank_out_of_range, "message_size": _check_message_size}


def _errors_worker(seed: int) -> None:
    """Every mistake raises on every rank (no randomness: `seed` is unused)."""
    init_commrt()
    run_checks(CHECKS, rank=dist.get_rank())
    dist.destroy_process_group()


launch = checks_fixture(_errors_worker, WORLD_SIZES, timeout=180, variants=MODES)


@pytest.mark.parametrize("check", CHECKS)
def test_backend_error(launch, check):
    assert_check(launch, check)


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
