"""Timeouts on the `commrt` backend (commrt/backend/watchdog.py): an operation a rank never
joins fails on the waiting ranks after the group's timeout (or Work.wait's) with a report
naming the op, its group, its sequence number, its signature, the ranks that have not
reached it and what each rank last did; the job then ends (exit 124) after the grace
period unless the group is destroyed, in which case the process carries on."""
from __future__ import annotations

import re
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from backend_util import init_commrt
from harness import run_ranks, run_ranks_status

TIMEOUT_S = 4.0
GRACE_S = 3.0


def _say(line: str) -> None:
    """Print `line` in one write: the ranks' stdout and stderr share one pipe, and print()
    writes the newline apart when stdout is unbuffered (PYTHONUNBUFFERED), so another
    rank's report could land inside the line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stamp(what: str) -> None:
    _say(f"STAMP {what} rank{dist.get_rank()} {time.time():.3f}")


def _missing_rank_worker(timeout_s: float) -> None:
    """Rank 1 skips the second all_reduce and stays alive; ranks 0 and 2 catch the timeout
    and carry on without destroying the group, so the grace period must end the job."""
    dist.init_process_group("commrt", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    t = torch.ones(5)
    dist.all_reduce(t)  # all three ranks: the progress entries show it
    if not torch.equal(t, torch.full((5,), 3.0)):
        raise AssertionError(f"all_reduce gave {t}")
    _say(f"EXPECT seq={dist.group.WORLD.seq + 1}")
    if rank == 1:
        time.sleep(120)  # alive, but never joins: the job must be ended for it
        raise AssertionError("rank 1 outlived the grace period")
    _stamp("enter")
    try:
        dist.all_reduce(torch.ones(5))
    except dist.DistBackendError as exc:
        _stamp("raised")
        _say(f"CAUGHT rank{rank}: {exc}")
    else:
        raise AssertionError("all_reduce without rank 1 did not time out")
    try:
        dist.all_reduce(torch.ones(5))
    except RuntimeError as exc:
        _say(f"REFUSED rank{rank}: {exc}")
    else:
        raise AssertionError("the timed-out group accepted another all_reduce")
    time.sleep(120)  # the grace timer must end the job before this returns
    raise AssertionError("the process outlived the grace period")


def test_timeout_report_and_job_end():
    """(a) 3 ranks, rank 1 missing from an all_reduce: both waiting ranks print the report
    (op, group, seq, signature, rank 1 missing, each rank's last activity), and the job
    ends with exit 124 between timeout+grace and timeout+grace+slack after the call."""
    code, out = run_ranks_status(_missing_rank_worker, 3, timeout=240,
                                 env={"COMMRT_TIMEOUT_GRACE": str(GRACE_S)},
                                 timeout_s=TIMEOUT_S)
    end = time.time()
    context = f"exit {code}; output:\n{out[-6000:]}"
    assert code == 124, context
    seq = int(re.search(r"EXPECT seq=(\d+)", out).group(1))
    enters = [float(m) for m in re.findall(r"STAMP enter rank[02] ([\d.]+)", out)]
    raised = {int(r): float(t) for r, t in re.findall(r"STAMP raised rank(\d) ([\d.]+)", out)}
    assert len(enters) == 2 and set(raised) == {0, 2}, context
    for r, t in raised.items():
        # never early; late by at most a watchdog tick plus a loaded machine's delays
        assert TIMEOUT_S - 0.05 <= t - min(enters) <= TIMEOUT_S + 4, (r, t - min(enters), out)
    elapsed = end - min(enters)
    assert TIMEOUT_S + GRACE_S - 0.1 <= elapsed <= TIMEOUT_S + GRACE_S + 15, (elapsed, context)
    for r in (0, 2):
        report = [line for line in out.splitlines() if line.startswith(f"[rank {r}] ")]
        text = "\n".join(report)
        # the report: printed once, naming everything asked for
        assert text.count("commrt: Timed out waiting 4000ms for all_reduce") == 1, context
        assert f"all_reduce #{seq} in group" in text, text
        assert "signature ('all_reduce', 5, torch.float32, 'sum', False)" in text, text
        assert f"ranks that have not reached all_reduce #{seq}: [1]" in text, text
        assert re.search(rf"rank 1: last posted all_reduce #{seq - 1} .*completed", text), text
        other = 2 - r
        # (the other waiting rank may have timed out already when this one reads)
        assert re.search(rf"rank {other}: (blocked in all_reduce #{seq}|last posted "
                         rf"all_reduce #{seq} .*failed)", text), text
        assert f"rank {r}: blocked in all_reduce #{seq}" in text, text
        assert "unless the group is destroyed" in text, text
        caught = re.search(rf"CAUGHT rank{r}: (.*)", out).group(1)
        assert " Timed out " in caught and "ranks not there: [1]" in caught, caught
        refused = re.search(rf"REFUSED rank{r}: (.*)", out).group(1)
        assert "unusable" in refused and f"all_reduce #{seq}" in refused, refused
    assert "ending the job (exit code 124)" in out, context


def _elapsed_raise(fn, low: float, high: float, *needles: str) -> str:
    """Run fn; it must raise a RuntimeError containing every needle after [low, high] s."""
    start = time.monotonic()
    try:
        fn()
    except RuntimeError as exc:
        took = time.monotonic() - start
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        if missing or not low <= took <= high:
            raise AssertionError(f"after {took:.2f} s (expected {low}-{high}) {msg!r} "
                                 f"lacking {missing}") from exc
        return msg
    raise AssertionError(f"nothing raised; expected {needles}")


def _recoverable_worker(grace_s: float) -> None:
    """Timeouts caught and their groups destroyed: the processes carry on past the grace
    period, and the default group still works."""
    init_commrt()
    rank, world = dist.get_rank(), dist.group.WORLD
    ranks = [0, 1, 2]

    # (c) torch's test_barrier_timeout_*: rank 0 alone in a barrier of a 1 s group
    group = dist.new_group(ranks, timeout=timedelta(seconds=1))
    if rank == 0:
        _elapsed_raise(lambda: dist.barrier(group), 0.95, 3.5, " Timed out ", "barrier #1",
                       "ranks not there: [1, 2]")
    dist.destroy_process_group(group)
    dist.barrier(world)

    # (d) new_group(timeout=) honoured for a collective: rank 1 skips a broadcast
    group = dist.new_group(ranks, timeout=timedelta(seconds=2))
    t = torch.arange(4.0)
    dist.broadcast(t, src=0, group=group)
    if rank != 1:
        _elapsed_raise(lambda: dist.broadcast(t, src=0, group=group), 1.95, 5.0,
                       "Timed out waiting 2000ms for broadcast #2", "ranks not there: [1]")
    dist.destroy_process_group(group)
    dist.barrier(world)

    # (b) Work.wait(timeout=) on an async op that never completes (group timeout 60 s)
    group = dist.new_group(ranks, timeout=timedelta(seconds=60))
    if rank == 2:
        work = dist.all_reduce(torch.ones(3), group=group, async_op=True)
        _elapsed_raise(lambda: work.wait(timeout=timedelta(seconds=1)), 0.95, 3.5,
                       "Timed out waiting 1000ms (Work.wait timeout) for all_reduce #1",
                       "ranks not there: [0, 1]")
    dist.destroy_process_group(group)
    dist.barrier(world)

    # (e) a recv nobody sends to times out at the group's timeout
    group = dist.new_group(ranks, timeout=timedelta(seconds=1.5))
    if rank == 0:
        _elapsed_raise(lambda: dist.recv(torch.empty(2), src=2, group=group), 1.45, 4.5,
                       "Timed out waiting 1500ms for recv #1", "the peer is rank 2")
    dist.destroy_process_group(group)
    dist.barrier(world)

    # (f) a future nobody waits on through Work.wait: the watchdog fails it at the deadline
    group = dist.new_group(ranks, timeout=timedelta(seconds=1))
    if rank == 1:
        future = dist.all_reduce(torch.ones(2), group=group, async_op=True).get_future()
        _elapsed_raise(future.wait, 0.95, 3.5, "Timed out waiting 1000ms for all_reduce #1",
                       "ranks not there: [0, 2]")
    dist.destroy_process_group(group)
    dist.barrier(world)

    # (g) a rank that rejects its own arguments waits for the others' agreement check,
    # which they never post: timed out too, not a hang
    group = dist.new_group(ranks, timeout=timedelta(seconds=1.5))
    if rank == 0:
        # (integer AVG: commrt rejects it locally, see the backend's reductions)
        bad = torch.ones(2, dtype=torch.int64)
        _elapsed_raise(lambda: dist.all_reduce(bad, op=dist.ReduceOp.AVG, group=group), 1.45, 4.5,
                       "Timed out waiting 1500ms for all_reduce #1", "ranks not there: [1, 2]")
    dist.destroy_process_group(group)
    dist.barrier(world)

    time.sleep(grace_s + 1.5)  # no grace timer may end the job: every group was destroyed
    t = torch.full((3,), float(rank))
    dist.all_reduce(t)
    if not torch.equal(t, torch.full((3,), 3.0)):
        raise AssertionError(f"all_reduce after the timeouts gave {t}")
    print(f"ALIVE rank{rank}", flush=True)


def test_timeouts_recoverable_by_destroying_the_group():
    """(b) Work.wait(timeout), (c) a lone barrier with a 1 s group timeout (torch's
    test_barrier_timeout_*), (d) new_group(timeout=), (e) a recv with no sender, (f) a
    future, (g) a rank alone in an agreement check: each raises DistBackendError ("Timed
    out") within its limit; the group is destroyed and the job carries on past the grace
    period."""
    out = run_ranks(_recoverable_worker, 3, timeout=240, env={"COMMRT_TIMEOUT_GRACE": "2"},
                    grace_s=2.0)
    assert all(f"ALIVE rank{r}" in out for r in range(3)), out[-6000:]
    assert "ending the job" not in out, out[-6000:]


def test_grace_setting(monkeypatch):
    """COMMRT_TIMEOUT_GRACE: seconds >= 0, default 10; anything else is a clear error."""
    from commrt.backend.watchdog import DEFAULT_GRACE_S, GRACE_ENV, grace_seconds

    monkeypatch.delenv(GRACE_ENV, raising=False)
    assert grace_seconds() == DEFAULT_GRACE_S == 10.0
    for raw, value in (("0", 0.0), ("2.5", 2.5), (" 30 ", 30.0)):
        monkeypatch.setenv(GRACE_ENV, raw)
        assert grace_seconds() == value
    for raw in ("-1", "soon", "nan", "inf"):
        monkeypatch.setenv(GRACE_ENV, raw)
        try:
            grace_seconds()
        except ValueError as exc:
            assert GRACE_ENV in str(exc) and repr(raw) in str(exc), exc
        else:
            raise AssertionError(f"{GRACE_ENV}={raw!r} accepted")


def _swallow_worker() -> None:
    """Rank 0 swallows a barrier timeout and returns; rank 1 never joins and returns."""
    dist.init_process_group("commrt", timeout=timedelta(seconds=1))
    if dist.get_rank() == 0:
        _elapsed_raise(dist.barrier, 0.95, 3.5, " Timed out ")
    else:
        time.sleep(3)
    print(f"RETURNING rank{dist.get_rank()}", flush=True)


def test_swallowed_timeout_still_fails_the_job():
    """A process that exits normally while a timed-out group was never destroyed ends the
    job with exit 124 at exit, without waiting for the (here 60 s) grace period."""
    start = time.monotonic()
    code, out = run_ranks_status(_swallow_worker, 2, timeout=120,
                                 env={"COMMRT_TIMEOUT_GRACE": "60"})
    assert code == 124, f"exit {code}; output:\n{out[-4000:]}"
    assert "RETURNING rank0" in out and "the process is exiting" in out, out[-4000:]
    assert time.monotonic() - start < 60, out[-4000:]
