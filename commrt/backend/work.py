"""Work objects of the `commrt` backend and the ordered completion of their futures.

A `CommrtWork` is one posted operation: its transport requests, the agreement check posted
beside them (`commrt.transports.agreement`), what to run once they complete (copy out of a
staging buffer, AVG's division) and the output tensors. It names the operation (`op`), its
sequence number in its group (`seq`), the tensors' `signature` and the group, for error
and timeout reports.

Futures are completed in the order their operations were issued, by a lazily started
daemon thread that polls with exponential back-off (50 us to 2 ms) while something is
pending and sleeps on a condition variable otherwise (no core burnt while idle). Callbacks
chained on a future (DDP comm hooks such as PowerSGD issue more collectives inside them)
therefore run in the same order on every rank. Before a thread issues a new collective it
first completes every pending future (`completer.settle()`, and so runs the callbacks
chained on them), so a collective issued inside a callback can never overtake, on one
rank but not another, a collective issued by the training thread: MPI matches collectives
by issue order. Futures requested inside a callback complete eagerly.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .validation import agreement_error
from .watchdog import watchdog

__all__ = ["CommrtWork", "Completer", "completed_work", "completer", "timeout_seconds"]


class Completer:
    """Completes the futures of `CommrtWork`s in issue order (see the module docstring)."""

    MIN_DELAY_S = 50e-6
    MAX_DELAY_S = 2e-3

    def __init__(self) -> None:
        self.queue: collections.deque[CommrtWork] = collections.deque()
        self.lock = threading.Lock()          # held by whoever completes the queue's head
        self.wakeup = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.local = threading.local()

    def in_callback(self) -> bool:
        return getattr(self.local, "active", False)

    def enqueue(self, work: CommrtWork) -> None:
        self.queue.append(work)
        with self.wakeup:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="commrt-progress",
                                               daemon=True)
                self.thread.start()
            self.wakeup.notify()

    def _complete_head(self, blocking: bool) -> bool:
        """Complete the queue's head if its requests are done (or wait for them). The
        caller holds self.lock."""
        head = self.queue[0]
        if not head.finish_requests(blocking):
            return False
        self.local.active = True
        try:
            head.resolve_future()
        finally:
            self.local.active = False
            self.queue.popleft()
        return True

    def settle(self, upto: CommrtWork | None = None) -> None:
        """Complete queued futures in order: all of them, or up to and including `upto`."""
        while self.queue:
            if upto is not None and upto.future_resolved:
                return
            with self.lock:
                if not self.queue:
                    return
                head = self.queue[0]
                self._complete_head(blocking=True)
            if head is upto:
                return

    def _loop(self) -> None:
        delay = self.MIN_DELAY_S
        while True:
            with self.wakeup:
                while not self.queue:
                    self.wakeup.wait()
            progressed = False
            if self.lock.acquire(blocking=False):
                try:
                    while self.queue and self._complete_head(blocking=False):
                        progressed = True
                finally:
                    self.lock.release()
            if progressed:
                delay = self.MIN_DELAY_S
            else:
                time.sleep(delay)
                delay = min(2 * delay, self.MAX_DELAY_S)


completer = Completer()
watchdog.watch_queue(completer.queue)


def timeout_seconds(timeout: Any) -> float:
    """0 (wait forever) for None/0/negative, else seconds."""
    if timeout is None:
        return 0.0
    if isinstance(timeout, timedelta):
        return max(timeout.total_seconds(), 0.0)
    return max(float(timeout), 0.0)


_Work_init = dist._Work.__init__
# Guards a Work's completion (finish step or failure) against another thread completing
# it at the same time (the completer, the watchdog); one for all Works, since the finish
# steps are short and a lock per Work costs on every call.
_completion_lock = threading.Lock()
_monotonic = time.monotonic


class CommrtWork(dist._Work):
    """A posted operation: requests, its agreement check, what to do after they complete,
    and the result.

    `wait()` blocks until the requests complete and the finishing step (copy out of a
    staging buffer, AVG's division) has run, then re-raises any error of the operation.
    The agreement check is examined first: when the ranks disagreed, the operation fails
    with ValueError without waiting for its (ill-matched) data requests. `get_future()`
    returns a Future whose value is `result()` (the output tensors).

    `requests` are transport Requests or other CommrtWorks (a coalesced operation); each
    has ``wait()``, ``test()`` and ``wait_or_wake()``. A blocking wait can be ended by the
    watchdog at the operation's deadline (watchdog.py).
    """

    # Slots: a Work is created per call, and attribute writes on a pybind object with a
    # __dict__ cost several times more (this is on the small-message hot path).
    __slots__ = ("requests", "result_tensors", "finish", "op", "seq", "signature", "group",
                 "check", "finished", "error", "future", "future_resolved", "posted",
                 "timeout_s")

    def __init__(self, requests: Sequence[Any], result: list, finish: Callable[[], None] | None,
                 op: str, seq: int = 0, signature: tuple | None = None, group: Any = None,
                 check: Any = None) -> None:
        _Work_init(self)
        self.requests = requests
        self.result_tensors = result
        self.finish = finish
        self.op = op
        self.seq = seq
        self.signature = signature
        self.group = group
        self.check = check
        self.finished = False
        self.error: BaseException | None = None
        # A future, once asked for (get_future); `future_resolved` is set with it.
        self.future: torch.futures.Future | None = None
        # Timeouts (watchdog.py): when it was posted, its own limit (None: the group's).
        self.posted = _monotonic()
        self.timeout_s: float | None = None

    def __repr__(self) -> str:
        return (f"CommrtWork({self.op}, seq={self.seq}, group={self.group_name!r}, "
                f"completed={self.finished})")

    @property
    def group_name(self) -> str:
        return "" if self.group is None else self.group.group_name

    def mismatch(self) -> str | None:
        """Without blocking: what the agreement check found wrong, if it has completed and
        the ranks disagreed (a timeout report names it); None otherwise."""
        check = self.check
        if check is None or not check.test() or check.agreed:
            return None
        return str(agreement_error(self.op, self.signature, check))

    # -- completion -------------------------------------------------------------------

    def _disagreed(self) -> None:
        """The agreement check completed and the ranks disagree: fail (the data requests,
        ill-matched, are never waited for) and make the group refuse later operations."""
        error = agreement_error(self.op, self.signature, self.check)
        if self.group is not None:
            self.group.mark_broken(self, error)
        self.fail(error)

    def finish_requests(self, blocking: bool) -> bool:
        """Complete the operation (blocking) or poll it; True once it has completed
        (blocking: always, having failed if it timed out or the ranks disagreed)."""
        if self.finished:
            return True
        if blocking:
            self._complete_blocking()
            return True
        check = self.check
        try:
            if check is not None:
                if not check.test():
                    return False
                if not check.agreed:
                    self._disagreed()
                    return True
            for req in self.requests:
                if not req.test():
                    return False
        except BaseException as exc:  # an MPI error: delivered to wait() and the future
            self.fail(exc)
            return True
        self._finished()
        return True

    def _complete_blocking(self) -> None:
        """Block until the requests complete, this work fails (timed out, or the ranks
        disagreed) or an MPI error is raised (delivered to wait() and the future)."""
        waiter = watchdog.waiter()
        wakeup = waiter.wakeup
        # What the watchdog sees this thread blocked in (a coalesced work blocks in its
        # parts, which note themselves in turn).
        outer, waiter.work = waiter.work, self
        check = self.check
        try:
            if check is not None:
                # (an already completed part returns at once: no separate test first)
                if not check.wait_or_wake(wakeup) and not self._after_wake(check, waiter):
                    return
                if not check.agreed:
                    self._disagreed()
                    return
            for req in self.requests:
                # (the check's request carries the data too: complete already)
                if req is not check and not req.wait_or_wake(wakeup) and \
                        not self._after_wake(req, waiter):
                    return
        except BaseException as exc:
            self.fail(exc)
            return
        finally:
            waiter.work = outer
        self._finished()

    def _finished(self) -> None:
        """The requests have completed: run the finishing step, once."""
        if self.finish is None:
            # Nothing to run: whoever sets `finished` first wins (a failure set by the
            # watchdog under the lock keeps its error), so no lock is needed.
            self.finished = True
            return
        with _completion_lock:
            if not self.finished:
                try:
                    self.finish()
                except BaseException as exc:
                    self.error = exc
                self.finished = True

    def _after_wake(self, part: Any, waiter: Any) -> bool:
        """The waiter's Wakeup ended a blocking wait for `part` (the check, a request, a
        coalesced part): keep waiting until `part` completes (True) or this work fails
        meanwhile (timed out, or failed with its group: False). The watchdog fires the
        Wakeup at a deadline (or spuriously); the waiter then times the work out itself,
        since it holds the request (nobody else may wait on it). The caller has noted this
        work as the waiter's."""
        while True:
            if self.finished:
                return False
            if watchdog.overdue(self, waiter) and not _settles(part):
                watchdog.expire(self, waiter)
                return False
            if part.wait_or_wake(waiter.wakeup):
                return True

    def wait_or_wake(self, wakeup: Any) -> bool:
        """As a part of a coalesced work: complete (blocking); raise this part's error.
        Never returns False: the part times itself out (its own deadline)."""
        self.finish_requests(blocking=True)
        if self.error is not None:
            raise self.error
        return True

    def fail(self, exc: BaseException) -> None:
        with _completion_lock:
            if not self.finished:
                self.error = exc
                self.finished = True

    def resolve_future(self) -> None:
        fut = self.future
        self.future_resolved = True
        if fut is None or fut.done():
            return
        if self.error is not None:
            fut.set_exception(self.error)
        else:
            fut.set_result(self.result_tensors)

    def test(self) -> bool:
        """Poll: True once the operation has completed (successfully or not)."""
        return self.finish_requests(blocking=False)

    # -- the c10d Work interface --------------------------------------------------------

    def wait(self, timeout: Any = None) -> bool:
        """Block until the operation completes; raise its error. It times out (see
        watchdog.py: report, DistBackendError, the group unusable, the job ends after a
        grace period) at its group's timeout, or after `timeout` if that ends first."""
        # c10d passes timedelta(0) ("no timeout of the call's own"): falsy, like None.
        if timeout and (seconds := timeout_seconds(timeout)) > 0:
            with watchdog.limit(seconds):
                return self.wait()  # (the wait below, under the limit)
        if self.future is not None and not completer.in_callback():
            completer.settle(upto=self)  # (returns at once if its future is resolved)
        elif not self.finished:
            self._complete_blocking()
        if self.error is not None:
            raise self.error
        return True

    def get_future(self) -> torch.futures.Future:
        if self.future is not None:
            return self.future
        fut = torch.futures.Future()
        self.future_resolved = False
        self.future = fut  # (from here on, wait() completes it through the completer)
        if self.finished or completer.in_callback():
            # Inside a callback, complete at once: keeps the callback's collectives in
            # issue order on every rank (the FIFO queue is being drained by this thread).
            self.finish_requests(blocking=True)
            self.resolve_future()
        else:
            completer.enqueue(self)
        return fut

    def is_completed(self) -> bool:
        return self.finish_requests(blocking=False)

    def is_success(self) -> bool:
        return self.is_completed() and self.error is None

    def exception(self) -> BaseException | None:
        return self.error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self.result_tensors

    def synchronize(self) -> None:
        self.wait()

    def source_rank(self) -> int:
        self.wait()
        source = getattr(self.requests[0], "source", None) if self.requests else None
        if source is None:
            raise RuntimeError("source_rank() is only defined for a receive from any source")
        return int(source)

    _source_rank = source_rank

    def block_current_stream(self) -> None:
        self.wait()


def _settles(part: Any) -> bool:
    """Whether `part` has completed, given a few tries: a test fails while another thread
    (the transport's progress thread, the completer) holds the request for a moment."""
    for _ in range(3):
        if part.test():
            return True
        time.sleep(0.002)
    return False


def completed_work(result: list, op: str, seq: int = 0, group: Any = None) -> CommrtWork:
    """A Work for an operation with nothing to send (e.g. an empty coalesced list)."""
    work = CommrtWork((), result, None, op, seq, (op,), group)
    work.finished = True
    return work
