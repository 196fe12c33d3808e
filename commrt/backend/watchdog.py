"""Timeouts of the `commrt` backend: one watchdog thread per process, every rank's
progress published to the group's store, and the report a timed-out operation prints.

Semantics
---------
- Every operation posted on a group, collective or point-to-point, must complete within
  the group's timeout (``init_process_group(timeout=)``, ``new_group(timeout=)``; torch's
  default for a non-NCCL backend is 30 minutes; ``barrier(timeout=)`` sets the barrier's
  own), counted from when it was posted. ``Work.wait(timeout)`` adds a limit of its own
  (whichever ends first applies).
- When one passes its limit, this rank prints one report to stderr (`Watchdog.expire`):
  the operation, the group, its sequence number in the group, its tensors' signature,
  which ranks of the group have not reached it, and what each rank last did. The operation
  then fails with ``torch.distributed.DistBackendError`` ("commrt: Timed out waiting
  <ms>ms for <op> #<seq> in group ...", a short form of the report): ``wait()`` raises it,
  its future is set to it. Every other pending operation of the group fails with it too,
  and the group refuses later operations: MPI cannot cancel a posted operation, so the
  group's communicator cannot be used again.
- COMMRT_TIMEOUT_GRACE seconds later (default 10; 0 ends at once) the process ends the
  whole job with MPI_Abort, exit code EXIT_CODE (124), unless every group that timed out
  has been destroyed (``dist.destroy_process_group`` calls the group's ``shutdown()``). A
  program or test that catches the error and destroys the group carries on. An uncaught
  error ends the job sooner, through the transport's abort-on-error hook (exit code 1);
  a process that exits while such a group is not destroyed ends the job at exit (124).
- An async Work nobody waits for and whose future nobody asked for is timed when it is
  waited for (its limit still counts from posting); a requested future is timed while
  queued.

Cost on the hot path: a Work stamps its creation time; a blocking wait notes the Work in
its thread's `Waiter` and sleeps in MPI_Waitany on the operation's requests plus the
thread's `commrt.transports.Wakeup` instead of in MPI_Wait. Nothing polls, and the
watchdog holds no reference to posted operations (retaining every Work until a tick made
the garbage collector's passes measurably slower per call): it sees only what can hang, the
Works that threads are blocked in and the futures queued for completion
(`watch_queue`). It wakes every TICK_S (and at the earliest deadline), fires the Wakeup
of a thread blocked in an expired operation (that thread then times the operation out
itself, having released its requests), times out expired queued futures, publishes
progress, and ends the job when a grace period runs out.

Progress in the store
---------------------
For each group, each rank's watchdog publishes under ``commrt_progress/<group rank>`` in
the group's store (a PrefixStore per group; the watchdog uses its own clone, so a main
thread blocked in the store never stalls it) the group's collective sequence number, the
last operation posted (the group's ``last_posted``) and the oldest one this rank is
blocked in or has queued, at most every PUBLISH_INTERVAL_S and only when they changed. A
timing-out rank publishes its own entry, then reads every rank's.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from commrt import transports as T
from commrt.transports.job import ABORT_GRACE_S

__all__ = ["DEFAULT_GRACE_S", "EXIT_CODE", "GRACE_ENV", "Waiter", "Watchdog", "grace_seconds",
           "watchdog"]

GRACE_ENV = "COMMRT_TIMEOUT_GRACE"
DEFAULT_GRACE_S = 10.0
EXIT_CODE = 124              # the job's exit status when a grace period runs out (as timeout(1))
TICK_S = 0.5                 # the watchdog's longest sleep
PUBLISH_INTERVAL_S = 0.5     # the shortest interval between two progress entries of a group
STORE_TIMEOUT = timedelta(seconds=5)  # the watchdog's store clone: a dead store costs this
PROGRESS_KEY = "commrt_progress/"

_monotonic = time.monotonic


def grace_seconds() -> float:
    """COMMRT_TIMEOUT_GRACE in seconds (default DEFAULT_GRACE_S); ValueError if malformed."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{GRACE_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


class Waiter:
    """A thread's means of being woken from a blocking wait (its transport `Wakeup`), the
    Work it is blocked in (`work`, None when not blocked) and the limit of its current
    ``Work.wait(timeout)`` (`deadline`, monotonic; None: none)."""

    __slots__ = ("wakeup", "work", "deadline", "timeout_s")

    def __init__(self) -> None:
        self.wakeup = T.Wakeup.of_thread()
        self.work: Any = None
        self.deadline: float | None = None
        self.timeout_s = 0.0


class _Group:
    """The watchdog's record of one process group."""

    __slots__ = ("group", "store", "timeout_s", "grace_s", "published", "published_at",
                 "broken_at", "broken_by", "error", "reporting", "store_error")

    def __init__(self, group: Any, store: Any, timeout_s: float, grace_s: float) -> None:
        self.group = group
        self.store = store
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.published: tuple = ()
        self.published_at = 0.0
        self.broken_at: float | None = None  # when an operation of the group timed out
        self.broken_by = ""
        self.error: BaseException | None = None  # what the group's operations fail with
        self.reporting = False           # a thread is writing the group's report
        self.store_error: str | None = None


def _timeout_s(timeout: Any) -> float:
    """Seconds of a timedelta or number; zero or negative: no limit (inf)."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return seconds if seconds > 0 else float("inf")


def _clone(store: Any) -> Any:
    """The watchdog's own connection to `store`, with a short timeout (None: no store)."""
    if store is None:
        return None
    try:
        clone = store.clone()
    except (RuntimeError, NotImplementedError):  # a store that cannot be cloned: share it
        clone = store
    clone.set_timeout(STORE_TIMEOUT)
    return clone


class Watchdog:
    """Deadlines of every posted operation, progress publication and grace periods (see
    the module docstring). One per process (`watchdog`)."""

    def __init__(self) -> None:
        self.groups: dict[int, _Group] = {}
        self.cond = threading.Condition(threading.Lock())
        self.alarms: list[tuple[float, int, Waiter]] = []
        self.alarm_ids = itertools.count()
        self.thread: threading.Thread | None = None
        self.stopped = False
        self.local = threading.local()
        self.waiters: list[Waiter] = []
        self.queues: list[collections.deque] = []

    # -- registration (group creation and destruction) ---------------------------------

    def add_group(self, group: Any, store: Any, timeout: Any) -> None:
        """Watch `group`'s operations: deadlines after `timeout` (a timedelta or seconds;
        None: torch's default, 30 min), progress published to `store` (the group's store;
        None: not published)."""
        grace = grace_seconds()
        timeout_s = _timeout_s(default_pg_timeout if timeout is None else timeout)
        record = _Group(group, _clone(store), timeout_s, grace)
        with self.cond:
            self.groups[id(group)] = record
            if self.thread is None:
                import atexit

                self.thread = threading.Thread(target=self._loop, name="commrt-watchdog",
                                               daemon=True)
                self.thread.start()
                # Registered after mpi4py's MPI_Finalize hook, so it runs before it.
                atexit.register(self.stop)
            self.cond.notify()

    def set_timeout(self, group: Any, timeout: Any) -> None:
        record = self.groups.get(id(group))
        if record is not None:
            record.timeout_s = _timeout_s(timeout)
            with self.cond:
                self.cond.notify()

    def remove_group(self, group: Any) -> None:
        """Stop watching `group` (destroyed): its operations are no longer timed, and a
        grace period running for it ends without ending the job."""
        with self.cond:
            self.groups.pop(id(group), None)

    def stop(self) -> None:
        """At interpreter exit: stop the thread (before MPI is finalized). A group that
        timed out and was not destroyed ends the job now, exit code EXIT_CODE: a process
        that swallowed the error must not end with status 0 while its peers may hang."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
            broken = [r for r in self.groups.values() if r.broken_at is not None]
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2 * TICK_S + STORE_TIMEOUT.total_seconds())
        if broken:
            self._end_job(broken[0], at_exit=True)

    # -- the hot path -------------------------------------------------------------------

    def waiter(self) -> Waiter:
        """The calling thread's Waiter."""
        try:
            return self.local.waiter
        except AttributeError:
            waiter = self.local.waiter = Waiter()
            with self.cond:
                self.waiters.append(waiter)
            return waiter

    def watch_queue(self, queue: collections.deque) -> None:
        """Also time the Works in `queue` (futures awaiting completion, in posting order)."""
        with self.cond:
            self.queues.append(queue)

    # -- Work.wait(timeout) -------------------------------------------------------------

    @contextmanager
    def limit(self, seconds: float) -> Iterator[Waiter]:
        """Within the block, the calling thread's blocking waits end `seconds` from now (the
        watchdog fires its Wakeup then). Nested limits: the earlier one applies."""
        waiter = self.waiter()
        outer = (waiter.deadline, waiter.timeout_s)
        deadline = _monotonic() + seconds
        if outer[0] is None or deadline < outer[0]:
            waiter.deadline, waiter.timeout_s = deadline, seconds
            with self.cond:
                heapq.heappush(self.alarms, (deadline, next(self.alarm_ids), waiter))
                self.cond.notify()
        try:
            yield waiter
        finally:
            waiter.deadline, waiter.timeout_s = outer

    def overdue(self, work: Any, waiter: Waiter) -> bool:
        """Whether `work`, which `waiter`'s thread is blocked in, has passed its limit (or
        its group has timed out already)."""
        now = _monotonic()
        if waiter.deadline is not None and now >= waiter.deadline:
            return True
        record = self.groups.get(id(work.group))
        return record is not None and (record.error is not None or
                                       now >= work.posted + self._limit_s(work, record))

    @staticmethod
    def _limit_s(work: Any, record: _Group) -> float:
        own = work.timeout_s
        return record.timeout_s if own is None else own

    # -- expiry ---------------------------------------------------------------------

    def expire(self, work: Any, waiter: Waiter | None = None) -> None:
        """Time `work` out (it is still pending past its limit): print the report, fail it
        and every other pending operation of its group, refuse the group's later
        operations and start the grace period. Idempotent."""
        record = self.groups.get(id(work.group))
        mine = False  # whether this call writes the group's report
        with self.cond:
            if record is not None:
                # One report per group: another operation's report may be under way.
                while record.reporting:
                    self.cond.wait()
                mine = record.reporting = record.error is None
            error = None if record is None else record.error
        try:
            if work.finished:
                return
            if error is not None:
                work.fail(error)
                return
            now = _monotonic()
            waited_s = now - work.posted
            explicit = waiter is not None and waiter.deadline is not None and \
                now >= waiter.deadline and (record is None or waiter.deadline <
                                            work.posted + self._limit_s(work, record))
            limit_s = waiter.timeout_s if explicit else \
                (self._limit_s(work, record) if record is not None else waited_s)
            report, head, summary = self._report(work, record, limit_s, waited_s, explicit)
            out = sys.__stderr__
            out.write(report)
            out.flush()
            error = dist.DistBackendError(summary)
            if record is None:
                work.fail(error)
                return
            if work.group is not None:
                work.group.mark_broken(work, dist.DistBackendError(head))
            with self.cond:
                if record.broken_at is None:
                    record.broken_at = now
                    record.broken_by = f"{work.op} #{work.seq}"
                    record.error = error
                self.cond.notify()
            work.fail(error)
            # The group's other pending operations fail with it (their threads wake).
            for w, blocked in self._pending():
                if w.group is work.group:
                    w.fail(error)
                    if blocked is not None and blocked is not waiter:
                        blocked.wakeup.fire()
        finally:
            if mine:
                with self.cond:
                    record.reporting = False
                    self.cond.notify_all()

    def _report(self, work: Any, record: _Group | None, limit_s: float, waited_s: float,
                explicit: bool) -> tuple[str, str, str]:
        """(the report printed on stderr, its first line, the exception's message)."""
        group = work.group
        rank = group.rank() if group is not None else -1
        size = group.size() if group is not None else 1
        name = work.group_name
        desc = getattr(group, "group_desc", "") if group is not None else ""
        desc = "" if desc == "undefined" else desc  # torch's description of an unnamed group
        p2p = work.op in _p2p_ops()
        what = f"{work.op} #{work.seq}"
        if p2p:
            what += " (this rank's point-to-point count)"
        head = (f"commrt: Timed out waiting {limit_s * 1000:.0f}ms"
                f"{' (Work.wait timeout)' if explicit else ''} for {what} in group {name!r} "
                f"({desc + ', ' if desc else ''}{size} ranks) after {waited_s:.1f} s; "
                f"signature {work.signature}")
        lines = [head]
        states: dict[int, dict | None] = {}
        problem = None
        if record is not None and record.store is not None:
            self._publish(record, [w for w, _ in self._pending() if w.group is group],
                          force=True)
            try:
                for r in range(size):
                    key = f"{PROGRESS_KEY}{r}"
                    states[r] = json.loads(record.store.get(key)) \
                        if record.store.check([key]) else None
            except Exception as exc:
                problem = f"could not read the ranks' progress from the store ({exc})"
        missing: list[int] = []
        disagree: list[str] = []
        peer = None
        if p2p:
            # (signature: op, numel, dtype, peer, tag; a receive from any source has peer -1)
            peer = work.signature[3] if work.signature and len(work.signature) > 3 else None
            peer = f"rank {peer}" if peer is not None and peer >= 0 else "any rank"
            lines.append(f"  the peer is {peer}; point-to-point operations have no group-wide "
                         "order, so see what it last did below")
        elif states:
            for r, state in states.items():
                if state is None or state["seq"] < work.seq:
                    missing.append(r)
                elif state["collective"] and state["collective"][1] == work.seq and \
                        state["collective"][2] != repr(work.signature):
                    op, seq, sig = state["collective"]
                    disagree.append(f"rank {r} posted {op} #{seq} with signature {sig}")
            lines.append(f"  ranks that have not reached {what}: {missing or 'none'}")
        mismatch = work.mismatch()
        if mismatch:
            lines.append(f"  the agreement check found: {mismatch}")
        if disagree:
            lines.append("  the ranks disagree on its arguments: " + "; ".join(disagree))
        if problem:
            lines.append(f"  {problem}")
        elif states:
            lines.append(f"  what each rank of the group last did (as published to the "
                         f"store within {PUBLISH_INTERVAL_S + TICK_S:g} s of a change):")
            now_wall = time.time()
            for r, state in states.items():
                lines.append(f"    rank {r}: {_describe(state, now_wall)}")
        grace = record.grace_s if record is not None else grace_seconds()
        tail = (f"MPI cannot cancel a posted operation: group {name!r} is unusable from now on, "
                f"and the job ends (exit code {EXIT_CODE}) in {grace:g} s ({GRACE_ENV}) unless "
                "the group is destroyed first")
        lines.append(f"  {tail}")
        prefix = f"[rank {rank}] " if group is not None else ""
        report = "".join(f"{prefix}{line}\n" for line in lines)
        summary = head
        if p2p:
            summary += f"; the peer is {peer}"
        elif states:
            summary += f"; ranks not there: {missing}"
        if disagree:
            summary += "; the ranks disagree on its arguments"
        summary += f". {tail}. Full report on rank {rank}'s stderr."
        return report, head, summary

    # -- the thread -----------------------------------------------------------------

    def _loop(self) -> None:
        candidates: dict[int, Any] = {}
        while not self.stopped:
            now = _monotonic()
            sleep = TICK_S
            pending = self._pending()
            by_group: dict[int, list] = {}
            for work, blocked in pending:
                by_group.setdefault(id(work.group), []).append(work)
                record = self.groups.get(id(work.group))
                if record is None or work.finished:
                    continue
                sleep = min(sleep, self._check(work, blocked, record, now, candidates))
            for record in list(self.groups.values()):
                sleep = min(sleep, record.timeout_s / 4)
                self._publish(record, by_group.get(id(record.group), ()))
                if record.broken_at is not None:
                    left = record.broken_at + record.grace_s - now
                    if left <= 0 and id(record.group) in self.groups:
                        self._end_job(record)
                    sleep = min(sleep, max(left, 0.0))
            with self.cond:
                while self.alarms and self.alarms[0][0] <= now:
                    _, _, waiter = heapq.heappop(self.alarms)
                    waiter.wakeup.fire()
                if self.alarms:
                    sleep = min(sleep, self.alarms[0][0] - now)
                if candidates:
                    sleep = min(sleep, 0.02)  # re-test expired works a moment later
                self.cond.wait(max(sleep, 0.001))

    def _pending(self) -> list[tuple[Any, Waiter | None]]:
        """(work, the Waiter blocked in it or None) for every Work that threads are blocked
        in or that is queued for completion."""
        found = [(w.work, w) for w in list(self.waiters) if w.work is not None]
        blocked = {id(work) for work, _ in found}
        for queue in self.queues:
            found.extend((work, None) for work in list(queue) if id(work) not in blocked)
        return found

    def _check(self, work: Any, blocked: Waiter | None, record: _Group, now: float,
               candidates: dict[int, Any]) -> float:
        """Act on `work` if it is past its limit; return how long until it is."""
        if record.error is None:
            left = work.posted + self._limit_s(work, record) - now
            if left > 0:
                return left
        if blocked is not None:
            # Its thread is blocked in it and holds its requests: that thread decides.
            blocked.wakeup.fire()
            return TICK_S
        # A queued future: test it; a test can fail while another thread (the transport's
        # progress thread, the completer) holds a request for a moment, so a work is timed
        # out only when it is still pending at a second look.
        if self._test(work):
            candidates.pop(id(work), None)
        elif id(work) in candidates:
            del candidates[id(work)]
            self.expire(work)
        else:
            candidates[id(work)] = work
        return TICK_S

    @staticmethod
    def _test(work: Any) -> bool:
        try:
            return work.test()
        except Exception:
            return True

    def _publish(self, record: _Group, pending: Sequence[Any] = (),
                 force: bool = False) -> None:
        """Put this rank's progress in `record`'s group into the store if it changed;
        `pending`: the group's Works that threads are blocked in or that are queued."""
        if record.store is None or record.store_error is not None:
            return
        now = _monotonic()
        if not force and now - record.published_at < PUBLISH_INTERVAL_S:
            return
        oldest = min((w for w in pending if not w.finished), key=lambda w: w.posted,
                     default=None)
        group = record.group
        last = getattr(group, "last_posted", None)
        seq = group.seq
        state = (seq, id(last), last is not None and last.finished, id(oldest))
        if state == record.published and not force:
            return
        p2p = _p2p_ops()
        blocked = {id(w.work) for w in list(self.waiters)}
        entry = {"wall": time.time(), "seq": seq,
                 "last": None if last is None else
                 [last.op, last.seq, repr(last.signature), now - last.posted,
                  "pending" if not last.finished else
                  "failed" if last.error is not None else "completed"],
                 "collective": None if last is None or last.op in p2p else
                 [last.op, last.seq, repr(last.signature)],
                 "pending": None if oldest is None else
                 [oldest.op, oldest.seq, now - oldest.posted, id(oldest) in blocked]}
        try:
            record.store.set(f"{PROGRESS_KEY}{group.rank()}", json.dumps(entry))
        except Exception as exc:
            record.store_error = str(exc)
            return
        record.published = state
        record.published_at = now

    def _end_job(self, record: _Group, at_exit: bool = False) -> None:
        group = record.group
        when = "the process is exiting" if at_exit else \
            f"the grace period ({GRACE_ENV}={record.grace_s:g}) is over"
        message = (f"[rank {group.rank()}] commrt: ending the job (exit code {EXIT_CODE}): "
                   f"{record.broken_by} in group {group.group_name!r} timed out "
                   f"{_monotonic() - record.broken_at:.1f} s ago, {when}, and the group was "
                   "not destroyed\n")
        sys.__stderr__.write(message)
        sys.__stderr__.flush()
        sys.stdout.flush()
        time.sleep(ABORT_GRACE_S)  # the launcher forwards output asynchronously
        T.world().abort(EXIT_CODE)


_P2P_OPS: frozenset | None = None


def _p2p_ops() -> frozenset:
    """process_group.P2P_OPS (imported on first use: process_group imports this module)."""
    global _P2P_OPS
    if _P2P_OPS is None:
        from .process_group import P2P_OPS

        _P2P_OPS = P2P_OPS
    return _P2P_OPS


def _describe(state: dict | None, now_wall: float) -> str:
    """One rank's published progress in words."""
    if state is None:
        return "no progress entry in the store (its watchdog has not published one yet)"
    since = max(now_wall - state["wall"], 0.0)
    parts = []
    pending = state["pending"]
    if pending is not None:
        op, seq, age, waiting = pending
        verb = "blocked in" if waiting else "has pending"
        parts.append(f"{verb} {op} #{seq} for {age + since:.1f} s")
    last = state["last"]
    if last is not None:
        op, seq, _, age, status = last
        if pending is None or pending[:2] != [op, seq]:
            parts.append(f"last posted {op} #{seq} {age + since:.1f} s ago ({status})")
    if not parts:
        parts.append("nothing posted on this group yet")
    parts.append(f"collectives posted: {state['seq']}")
    return "; ".join(parts)


watchdog = Watchdog()
