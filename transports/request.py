"""Requests: what a transport operation returns, completed by a wait, a test or the
background progress thread; and the persistent slots of a communicator's agreement checks.

A `Request` holds one or more MPI requests, the staging to finish on completion
(`buffers.Staged`), and optionally an agreement check posted just ahead of its data
(`commrt.transports.agreement`). `_Progress`, a daemon thread, tests the requests nobody
waits on, so communication advances while the caller computes.
"""
from __future__ import annotations

import _thread
import collections
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import library
from .agreement import SIGNATURE_SLOTS
from .buffers import Staged
from .wakeup import Wakeup

_monotonic = time.monotonic
_RLock = _thread.RLock  # (threading.RLock is a Python wrapper around it: 2x the cost)


class _Progress:
    """Background progress: a daemon thread tests posted requests that nobody is waiting
    on, so that an operation advances while its caller computes instead of only once the
    caller waits (MPICH moves data only inside MPI calls, and a collective cannot finish
    on any rank while one rank makes no MPI calls: async collectives would otherwise only
    really start at wait()).

    The posting path keeps only the last RING requests (a request pushed out of the ring
    while still pending moves to `overflow`, which the thread adopts); a request that is
    waited for promptly, as every blocking call's is, is never held anywhere else. Holding
    every request until the thread's next look, instead, cost ~1.5 us per blocking call
    (hundreds of live objects per look: allocator and garbage-collector churn, measured
    with perf.bench.backend). The thread is woken (a condition notify) only when it had gone
    idle (nothing posted and nothing pending for IDLE_AFTER_S).

    The thread leaves a request alone until it is MIN_AGE_S old, so a request nobody
    waits on is first tested within SLOW_DELAY_S + MIN_AGE_S: a blocking caller waits on
    its request within microseconds, and a thread that tested those too would race their
    waiters and, finding work, poll fast, taking the GIL from the calling thread. A request
    whose caller is blocked in `wait()` holds the request's lock, so the thread skips it
    without calling MPI. While nothing old enough is pending the thread wakes every
    SLOW_DELAY_S; once a request has stayed incomplete and unwaited over two consecutive
    looks, it polls with exponential back-off from MIN_DELAY_S to MAX_DELAY_S (reset when
    a test completes a request). Stopped at interpreter exit before mpi4py finalizes MPI
    (atexit runs in reverse order).
    """

    MIN_DELAY_S = 50e-6
    MAX_DELAY_S = 2e-3
    SLOW_DELAY_S = 10e-3
    IDLE_AFTER_S = 0.1
    MIN_AGE_S = 1e-3
    RING = 8

    def __init__(self) -> None:
        # (request, when posted) of the last RING posts, and of older ones still pending
        # when pushed out of the ring; the thread adopts from both.
        self.ring: collections.deque[tuple[Request, float]] = collections.deque()
        self.overflow: collections.deque[tuple[Request, float]] = collections.deque()
        # The thread's own: adopted, not complete.
        self.pending: dict[int, tuple[Request, float]] = {}
        self.cond = threading.Condition(threading.Lock())
        self.idle = True
        self.stopped = False
        self.thread: threading.Thread | None = None

    def watch(self, req: Request) -> None:
        ring = self.ring
        if len(ring) >= self.RING:
            old = ring.popleft()
            if not old[0]._done:
                self.overflow.append(old)
        ring.append((req, _monotonic()))
        # Read after the append: the thread sets `idle` and then re-checks the ring under
        # the condition's lock, so either it sees this request or this sees idle.
        if self.idle:
            with self.cond:
                if self.stopped:
                    return
                if self.thread is None:
                    import atexit

                    self.thread = threading.Thread(target=self._loop, name="commrt-mpi-progress",
                                                   daemon=True)
                    self.thread.start()
                    atexit.register(self.stop)
                self.idle = False
                self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)

    def _adopt(self) -> None:
        """Take every pending request of the ring and the overflow into `pending`."""
        pending, overflow = self.pending, self.overflow
        for entry in list(self.ring):  # (one C call: atomic against posting threads)
            if not entry[0]._done:
                pending[id(entry[0])] = entry
        while True:
            try:
                entry = overflow.popleft()
            except IndexError:
                return
            if not entry[0]._done:
                pending[id(entry[0])] = entry

    def _posted_since(self, last: Any) -> tuple[bool, Any]:
        """(whether anything was posted since the ring's newest entry was `last`, the
        newest entry now)."""
        newest = self.ring[-1] if self.ring else None
        return newest is not last, newest

    def _loop(self) -> None:
        delay = self.SLOW_DELAY_S
        quiet_since: float | None = None
        outstanding: set[int] = set()   # tested incomplete and unwaited at the last look
        pending = self.pending
        newest: Any = None
        while True:
            with self.cond:
                posted, newest = self._posted_since(newest)
                if posted or pending or self.overflow:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > self.IDLE_AFTER_S:
                    self.idle = True
                while self.idle and not pending and not self.overflow and not self.stopped \
                        and not self._posted_since(newest)[0]:
                    self.cond.wait()
                if self.stopped:
                    return
                if self.idle:
                    self.idle, quiet_since = False, None
            time.sleep(delay)
            self._adopt()
            progressed, still = False, set()
            born_after = time.monotonic() - self.MIN_AGE_S
            for key, (req, posted_at) in list(pending.items()):
                if self.stopped:
                    return
                if req._done:  # completed by its waiter (or cancelled)
                    del pending[key]
                    continue
                if posted_at > born_after:  # too young: looked at on the next wake
                    continue
                try:
                    state = req._poll()
                except Exception:  # an MPI error: its waiter gets it from wait()
                    del pending[key]
                    continue
                if state is True:
                    progressed = True
                    del pending[key]
                elif state is False:
                    still.add(key)
            if progressed:
                delay = self.MIN_DELAY_S
            elif still & outstanding:  # work in flight that nobody waits on: poll fast
                delay = self.MIN_DELAY_S if delay >= self.SLOW_DELAY_S else \
                    min(2 * delay, self.MAX_DELAY_S)
            else:
                delay = self.SLOW_DELAY_S
            outstanding = still


_progress = _Progress()


class Request:
    """A pending operation: one or more MPI requests and what to do when they complete.

    `wait()` blocks (releasing the GIL inside MPI) and `test()` polls; both are safe to call
    from several threads, and the completion work (copy back into non-contiguous or device
    tensors, downcast after an upcast reduction) runs exactly once. From posting until it
    completes, a request is also progressed by a background thread (`_Progress`), so
    communication overlaps the caller's computation without any call from the caller;
    completion work and callbacks may therefore run on that thread. With `status=True`
    (receives), `source` and `nbytes` say who sent how many bytes.

    Agreement: an operation posted with ``check=`` (an agreement vector, see
    `commrt.transports.agreement`) posts that check just ahead of its data, and its
    request waits for the check first. `agreed` is None while the check is in flight, then
    whether every rank sent the same vector (True when there is no check). If they did
    not, the request ends there: `wait()`, `wait_or_wake()` and `test()` report it as
    settled without its data (`done` stays False, the data requests, ill-matched, are
    abandoned), and `rejected`, `all_rejected`, `low` and `high` describe the result.
    """

    # Built and completed on every call's path: no work beyond what a request needs (no
    # MPI status unless asked for, no callback list unless one is added, the check waited
    # inside the same call as the data).
    __slots__ = ("_reqs", "_staged", "_buffers", "_done", "_lock", "_callbacks", "_status",
                 "_check", "agreed", "source", "nbytes")

    def __init__(self, reqs: list, staged: Sequence[Staged] = (), *, buffers: Any = None,
                 status: bool = False, check: tuple | None = None) -> None:
        self._reqs = reqs
        self._staged = staged
        # What MPI reads and writes, held until completion: MPI sees only raw addresses.
        self._buffers = buffers
        self._callbacks: list | None = None
        self._done = False
        self._lock = _RLock()
        self._status = status and len(reqs) == 1
        # (MPI request, result buffer, what this rank sent, (slots, index) or None) of a
        # posted agreement check.
        self._check = check
        self.agreed: bool | None = True if check is None else None
        if check is not None and check[3] is not None:
            slots, index = check[3]
            slots.owners[index] = self
        self.source: int | None = None  # irecv: the rank the message came from
        self.nbytes: int | None = None  # irecv: the bytes actually received
        if reqs or check is not None:
            _progress.watch(self)

    @classmethod
    def completed(cls, staged: Sequence[Staged] = ()) -> Request:
        req = cls([], staged)
        req._complete(None)
        return req

    @property
    def done(self) -> bool:
        return self._done

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Run `fn()` once the request completes (at once if it already has)."""
        with self._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn()

    # -- the agreement check ----------------------------------------------------------

    def _settle_check(self) -> bool:
        """The check's MPI request has completed: set and return `agreed`."""
        _, result, sent, slot = self._check
        self.agreed = result == sent
        if not self.agreed and slot is not None:  # (the slot's buffer will be reused)
            self._check = (None, bytes(result), sent, None)
        return self.agreed

    def _settle_check_now(self) -> None:
        """Wait for the check (not the data) and examine it: its persistent slot is
        about to be started again (`CheckSlots`)."""
        with self._lock:
            if self.agreed is None:
                self._check[0].Wait()
                self._settle_check()

    def _values(self) -> np.ndarray:
        if self._check is None or self.agreed is None:
            raise RuntimeError("the request has no completed agreement check")
        # Agreed: the result is what this rank sent (a persistent slot's buffer may have
        # been reused since).
        return np.frombuffer(self._check[2] if self.agreed else self._check[1],
                             dtype=np.int64)

    @property
    def rejected(self) -> bool:
        """Whether some rank flagged its own arguments as rejected."""
        return bool(self._values()[0] != 0)

    @property
    def all_rejected(self) -> bool:
        """Whether every rank did."""
        values = self._values()
        return bool(values[0] != 0 and values[len(values) // 2] != 0)

    @property
    def high(self) -> list[int]:
        """Per position of the vector (after the flag), the maximum over ranks."""
        values = self._values()
        return values[1:len(values) // 2].tolist()

    @property
    def low(self) -> list[int]:
        """Per position, the minimum over ranks."""
        values = self._values()
        return (-values[len(values) // 2 + 1:]).tolist()

    # -- completion -------------------------------------------------------------------

    def wait(self) -> Request:
        """Block until complete (or, with a check, until the ranks are found to disagree)."""
        if self._done or self.agreed is False:
            return self
        with self._lock:
            if not self._done and self.agreed is not False:
                if self.agreed is None:
                    self._check[0].Wait()
                    if not self._settle_check():
                        return self
                status = library.MPI.Status() if self._status else None
                if len(self._reqs) == 1:
                    self._reqs[0].Wait(status)
                elif self._reqs:
                    library.MPI.Request.Waitall(self._reqs)
                self._complete(status)
        if self._callbacks:
            self._run_callbacks()
        return self

    def wait_or_wake(self, wakeup: Wakeup) -> bool:
        """`wait()`, unless `wakeup` fires first: then return False (still pending)."""
        if self._done or self.agreed is False:
            return True
        with self._lock:
            if not self._done and self.agreed is not False:
                if self.agreed is None:
                    if not wakeup.wait(self._check[0]):
                        return False
                    if not self._settle_check():
                        return True
                if len(self._reqs) == 1:
                    status = library.MPI.Status() if self._status else None
                    if not wakeup.wait(self._reqs[0], status):
                        return False
                else:
                    status = None
                    REQUEST_NULL = library.MPI.REQUEST_NULL
                    for req in self._reqs:  # a completed one is MPI_REQUEST_NULL
                        if req != REQUEST_NULL and not wakeup.wait(req):
                            return False
                self._complete(status)
        if self._callbacks:
            self._run_callbacks()
        return True

    def test(self) -> bool:
        """Poll: True once complete (or, with a check, once the ranks disagree)."""
        return self._poll() is True

    def cancel(self) -> None:
        """Withdraw a pending receive (MPI_Cancel) so that no later message can match it;
        a receive that completed meanwhile completes as usual. For receives only (MPICH
        cannot cancel sends)."""
        with self._lock:
            if self._done:
                return
            MPI = library.load_mpi()
            for req in self._reqs:
                if req != MPI.REQUEST_NULL:
                    req.Cancel()
            statuses = [MPI.Status() for _ in self._reqs]
            MPI.Request.Waitall(self._reqs, statuses)
            if any(st.Is_cancelled() for st in statuses):
                # Nothing arrived: no completion work (it would copy garbage back), no
                # callbacks.
                self._staged, self._buffers, self._callbacks, self._done = (), None, None, True
                return
            self._complete(statuses[0] if len(statuses) == 1 else None)
        self._run_callbacks()

    def _poll(self) -> bool | None:
        """True: complete (completion work done), or the ranks disagree; False: tested,
        not complete; None: another thread holds the request (waiting on it or
        completing it)."""
        if self._done or self.agreed is False:
            return True
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self._done and self.agreed is not False:
                if self.agreed is None:
                    if not self._check[0].Test():
                        return False
                    if not self._settle_check():
                        return True
                status = library.MPI.Status() if self._status else None
                if len(self._reqs) == 1:
                    finished = self._reqs[0].Test(status)
                else:
                    finished = library.MPI.Request.Testall(self._reqs)
                if not finished:
                    return False
                self._complete(status)
        finally:
            self._lock.release()
        if self._callbacks:
            self._run_callbacks()
        return True

    def _complete(self, status) -> None:
        if status is not None:
            self.source = status.Get_source()
            self.nbytes = status.Get_count(library.MPI.BYTE)
        if self._staged:
            for s in self._staged:
                s.finish()
            self._staged = ()
        # A completed request may stay referenced a while (the progress ring, a Work):
        # it keeps nothing else alive.
        self._buffers = None
        self._reqs = ()
        # Callbacks run before the request counts as done (the caller holds the lock, a
        # reentrant one, so a callback may add callbacks): whoever sees it done, e.g. a
        # wait() returning early because the progress thread completed it, also sees their
        # effects (the received-bytes count).
        while self._callbacks:
            callbacks, self._callbacks = self._callbacks, None
            for fn in callbacks:
                fn()
        self._done = True

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            fn()


def wait_all(requests: Iterable[Request]) -> None:
    """Wait for every request (in order; each one's completion work runs as it finishes)."""
    for req in requests:
        req.wait()


class CheckSlots:
    """Persistent MAX-allreduces (MPI_Allreduce_init) for a communicator's agreement checks
    of the common size (a fixed-size signature, NBYTES): starting one costs a fraction of
    posting a new MPI_Iallreduce, which every collective's check would otherwise pay.

    Checks take the COUNT slots in turn, so every rank starts the same slot for the same
    check (all ranks post a communicator's checks in the same order, as collectives).
    Before a slot is started again, the request that used it last must have examined its
    result: it is made to, blocking, in the rare case that it has not (COUNT checks later).
    """

    NBYTES = 2 * SIGNATURE_SLOTS * 8  # a signature's int64 codes and their negations
    COUNT = 32

    def __init__(self, mpi_comm: Any) -> None:
        MPI = library.MPI
        self.results = [bytearray(self.NBYTES) for _ in range(self.COUNT)]
        self.requests = [mpi_comm.Allreduce_init(MPI.IN_PLACE, [buf, self.NBYTES >> 3,
                                                                MPI.INT64_T], MPI.MAX)
                         for buf in self.results]
        self.owners: list[Request | None] = [None] * self.COUNT
        self.next = 0
        # MPICH warns about persistent requests left at MPI_Finalize; registered after
        # mpi4py's finalizer, this runs before it.
        import atexit

        atexit.register(self.free)

    def start(self, check: bytes) -> tuple:
        """Start the next slot with this rank's vector: the Request's check tuple."""
        i = self.next
        self.next = (i + 1) % self.COUNT
        owner = self.owners[i]
        if owner is not None and owner.agreed is None:
            owner._settle_check_now()
        result = self.results[i]
        result[:] = check
        request = self.requests[i]
        request.Start()
        return request, result, check, (self, i)

    def free(self) -> None:
        """Free the slots whose last check has been examined. One still in flight (its
        operation timed out, or its peers never posted it) is left alone: freeing an
        active persistent collective crashed MPICH at MPI_Finalize (about 1 run in 5)."""
        import atexit

        atexit.unregister(self.free)  # (a program may make and free many groups)
        requests, owners = self.requests, self.owners
        self.requests, self.owners = [], []
        for request, owner in zip(requests, owners):
            if owner is None or owner.agreed is not None:
                request.Free()

