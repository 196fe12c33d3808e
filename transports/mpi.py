"""The MPI transport: moves torch tensors between ranks with non-blocking MPI requests.

Every operation takes torch tensors of any dtype (float16, bfloat16 and bool included), on
the CPU or, where a GPU is present, on CUDA, contiguous or not, and returns a `Request`
backed by real MPI requests. Data-movement operations (send, broadcast, gathers, all-to-all)
travel as raw bytes; reductions use the matching MPI datatype, with float16/bfloat16
upcast to float32 for the reduction because MPI has no portable half-precision type (a sum
of raw bytes as integers would be silently wrong).

CUDA tensors go to MPI directly when the library is CUDA-aware (see `cuda_aware`), after
synchronising the producing stream, since mpi4py never synchronises streams. Otherwise
they are staged through reusable pinned host buffers and copied back on completion.

Every byte sent is counted in `commrt.transports.wire` under a *kind* label (see
counters.py for the accounting rule).
"""
from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .agreement import SIGNATURE_SLOTS
from .counters import wire

# Wildcards of commrt's own (MPI's values differ between libraries); mapped at the call.
ANY_SOURCE = -1
ANY_TAG = -1

# The mpi4py.MPI module, imported on first use so `import commrt` stays cheap. Code that
# only runs once a communicator or request exists reads `_MPI` directly (hot path).
_MPI: Any = None

# MPICH settings commrt chooses unless the environment sets them. MPICH reads them when
# MPI is initialised (mpi4py does so when `mpi4py.MPI` is first imported), so they apply
# when commrt is imported before mpi4py.MPI. The non-blocking reduce-scatter's default
# algorithms ran 8-10x slower than the blocking one at some sizes (2 ranks, shm: 1 MiB
# 870-1180 us against 100-107 us); the pairwise one runs within 2-3% of it
# (perf/results: backend).
MPICH_DEFAULTS = {"MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM": "sched_pairwise"}
for _name, _value in MPICH_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def _mpi():
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


# --------------------------------------------------------------------------------------
# CUDA awareness and host staging


def library_version() -> str:
    """The first line of the MPI library's version string (starts MPI if it is not yet)."""
    return _mpi().Get_library_version().strip().splitlines()[0].strip()


_cuda_aware: bool | None = None


def cuda_aware() -> bool:
    """Whether MPI may be handed CUDA device pointers.

    `COMMRT_CUDA_AWARE=0|1` overrides the query. Otherwise MPICH is asked with
    `MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA)` and Open MPI with
    `MPIX_Query_cuda_support()`, both looked up with ctypes in the MPI library mpi4py is
    linked against; a library that answers neither is treated as not CUDA-aware.
    """
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("COMMRT_CUDA_AWARE")
        if env is not None:
            _cuda_aware = env.strip().lower() in ("1", "true", "yes")
        else:
            _cuda_aware = _query_cuda_aware()
    return _cuda_aware


def _query_cuda_aware() -> bool:
    MPI = _mpi()
    try:
        lib = ctypes.CDLL(MPI.__file__)
    except OSError:
        return False
    if "MPICH" in MPI.Get_library_version() and hasattr(lib, "MPIX_GPU_query_support"):
        supported = ctypes.c_int(0)
        cuda_kind = 0  # MPIX_GPU_SUPPORT_CUDA is the first enumerator in mpi.h
        if lib.MPIX_GPU_query_support(cuda_kind, ctypes.byref(supported)) == 0:
            return bool(supported.value)
        return False
    if hasattr(lib, "MPIX_Query_cuda_support"):
        return bool(lib.MPIX_Query_cuda_support())
    return False


class _PinnedPool:
    """Reusable page-locked host buffers, so staging does not pin memory per call."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(nbytes - 1, 0).bit_length()  # round up: reuse across nearby sizes
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)


_pinned = _PinnedPool()


# --------------------------------------------------------------------------------------
# Tensors as MPI buffers

_REDUCE_OPS = ("sum", "max", "min", "product", "band", "bor", "bxor")
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


_DATATYPES: dict = {}
_OPS: dict = {}
_BOOL_OPS: dict = {}


def _build_tables() -> None:
    """Map torch dtypes and reduction names to MPI objects, once (the hot path looks up)."""
    MPI = _mpi()
    _DATATYPES.update({
        torch.float64: MPI.DOUBLE, torch.float32: MPI.FLOAT,
        torch.int8: MPI.INT8_T, torch.int16: MPI.INT16_T, torch.int32: MPI.INT32_T,
        torch.int64: MPI.INT64_T, torch.uint8: MPI.UINT8_T, torch.bool: MPI.C_BOOL,
        torch.complex64: MPI.C_FLOAT_COMPLEX, torch.complex128: MPI.C_DOUBLE_COMPLEX,
    })
    _OPS.update({"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "product": MPI.PROD,
                 "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR})
    # torch's convention for bool: sum/max/bor are OR, product/min/band are AND.
    _BOOL_OPS.update({"sum": MPI.LOR, "max": MPI.LOR, "bor": MPI.LOR, "min": MPI.LAND,
                      "product": MPI.LAND, "band": MPI.LAND, "bxor": MPI.LXOR})


def _mpi_datatype(dtype: torch.dtype):
    if not _DATATYPES:
        _build_tables()
    try:
        return _DATATYPES[dtype]
    except KeyError:
        raise ValueError(f"commrt cannot reduce tensors of dtype {dtype}") from None


_reduce_specs: dict[tuple, tuple] = {}


def _mpi_op(op: str, dtype: torch.dtype) -> tuple:
    """(MPI.Op, MPI datatype, whether the data is upcast first) of reduction `op` on
    tensors of `dtype`; cached, as every reduction looks it up."""
    spec = _reduce_specs.get((op, dtype))
    if spec is None:
        wire_dtype = _UPCAST.get(dtype, dtype)
        spec = _reduce_specs[(op, dtype)] = \
            _reduce_spec(op, wire_dtype) + (wire_dtype is not dtype,)
    return spec


def _reduce_spec(op: str, dtype: torch.dtype) -> tuple:
    if not _OPS:
        _build_tables()
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; expected one of {', '.join(_REDUCE_OPS)}")
    if dtype == torch.bool:
        return _BOOL_OPS[op], _mpi_datatype(dtype)
    if op in ("band", "bor", "bxor") and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"bitwise reduction {op!r} needs an integer or bool tensor, got {dtype}")
    if op in ("max", "min") and dtype.is_complex:
        raise ValueError(f"{op!r} is not defined for complex tensors")
    return _OPS[op], _mpi_datatype(dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _buf(t: torch.Tensor, nbytes: int | None = None):
    """An mpi4py buffer over the bytes of contiguous tensor `t` (host or device memory);
    `nbytes`, where the caller knows it, spares computing it again."""
    return _mpi().buffer.fromaddress(t.data_ptr(), _nbytes(t) if nbytes is None else nbytes)


class _Staged:
    """The contiguous, MPI-reachable tensor an operation works on, and how to copy back.

    `work` is what MPI reads or writes. It is `t` itself when `t` is already contiguous,
    of a wire dtype and reachable by MPI; otherwise a copy (contiguous, upcast, or in pinned
    host memory), and `finish()` writes the result back into `t`.
    """

    __slots__ = ("orig", "work", "pinned", "writeback")

    def __init__(self, t: torch.Tensor, *, reduce: bool, writeback: bool):
        self.orig = t
        self.pinned = None
        self.writeback = False
        dtype = _UPCAST.get(t.dtype, t.dtype) if reduce else t.dtype
        if t.is_cpu and dtype is t.dtype and t.is_contiguous():
            self.work = t  # the common case, decided without building a torch.device
            return
        on_device = t.device.type != "cpu"
        if on_device and t.device.type != "cuda":
            raise ValueError(f"commrt transport supports CPU and CUDA tensors, got {t.device}")
        if on_device and cuda_aware():
            work = t if (t.is_contiguous() and dtype == t.dtype) else t.contiguous().to(dtype)
            # mpi4py does not synchronise streams: the producer must be done before MPI reads.
            torch.cuda.current_stream(t.device).synchronize()
        elif on_device:
            nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
            self.pinned = _pinned.take(nbytes)
            work = self.pinned[:nbytes].view(dtype).view(t.shape)
            work.copy_(t)  # device-to-host from pageable view: synchronous w.r.t. the stream
        elif t.is_contiguous() and dtype == t.dtype:
            work = t
        else:
            work = t.contiguous().to(dtype) if dtype != t.dtype else t.contiguous()
        self.work = work
        self.writeback = writeback and work is not t

    def finish(self) -> None:
        if self.writeback:
            self.orig.copy_(self.work)
        if self.pinned is not None:
            _pinned.give(self.pinned)
            self.pinned = None


def _stage_in(t: torch.Tensor, reduce: bool = False) -> tuple[torch.Tensor, tuple]:
    """(the tensor MPI reads, the staging to finish on completion: () when none)."""
    return _stage(t, reduce, False)


def _stage_out(t: torch.Tensor, reduce: bool = False) -> tuple[torch.Tensor, tuple]:
    """(the tensor MPI writes, the staging that copies it back on completion)."""
    return _stage(t, reduce, True)


def _stage(t: torch.Tensor, reduce: bool, writeback: bool) -> tuple[torch.Tensor, tuple]:
    # The common case (a contiguous CPU tensor of a wire dtype) allocates nothing: this is
    # on every call's path.
    if t.is_cpu and t.is_contiguous() and not (reduce and t.dtype in _UPCAST):
        return t, ()
    staged = _Staged(t, reduce=reduce, writeback=writeback)
    return staged.work, (staged,)


# --------------------------------------------------------------------------------------
# Requests


_monotonic = time.monotonic


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
    with perf.backend). The thread is woken (a condition notify) only when it had gone
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


# Environment variables that say how many ranks share this node: MPICH's and Intel MPI's
# launcher, Open MPI's, Slurm's, torchrun's.
LOCAL_RANKS_ENV = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                   "LOCAL_WORLD_SIZE")


def oversubscribed(env: Any = None, cores: int | None = None) -> bool:
    """Whether this node runs more ranks than this process may use cores: the launcher's
    local rank count (`env`, default os.environ) against `cores` (default: the CPU
    affinity). True when the launcher does not say."""
    env = os.environ if env is None else env
    local = next((env[k] for k in LOCAL_RANKS_ENV if k in env), "")
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    return not local.isdigit() or int(local) > cores


class Wakeup:
    """Lets another thread end this thread's blocking waits (a timeout watchdog does).

    `wait(request)` waits for the given mpi4py request or a 1-byte receive pre-posted on a
    private duplicate of MPI_COMM_SELF; `fire()`, from any thread, sends that byte, so the
    wait returns False, and the receive is posted again. A fire that finds no waiter makes
    the thread's next wait return False once (a spurious wake: callers re-check their
    condition and wait again). One per thread (`Wakeup.of_thread()`). Needs
    MPI_THREAD_MULTIPLE, mpi4py's default.

    How it waits depends on whether the node is `oversubscribed`. With a core per rank:
    in MPI_Waitany, which polls without pause (the fastest: 2.1 us for a 1 KiB allreduce
    at 2 ranks, against 3.2 us in MPI_Wait). With more ranks than cores, MPI_Waitany is
    ruinous: unlike MPI_Wait it never yields the core (MPICH's progress throttle does not
    apply), so the rank a waiter shares its core with cannot progress (4 ranks on 2 cores,
    1 KiB allreduce: 300 us against 21 us in MPI_Wait). There it tests in a loop instead,
    yielding the core (sched_yield, GIL released) after every unsuccessful test: 24 us
    (spinning 20 tests before yielding: 31 us; 200: 108 us).
    """

    _polls: bool | None = None  # whether waits test in a loop (oversubscribed; decided once)

    __slots__ = ("_tag", "_buf", "_recv")

    _comm: Any = None
    _next_tag = 0
    _create_lock = threading.Lock()
    _local = threading.local()

    def __init__(self) -> None:
        MPI = _mpi()
        with Wakeup._create_lock:
            if Wakeup._comm is None:
                Wakeup._comm = MPI.COMM_SELF.Dup()
            self._tag = Wakeup._next_tag
            Wakeup._next_tag = (Wakeup._next_tag + 1) % 32768  # MPI guarantees 32767
        self._buf = bytearray(1)
        self._recv = Wakeup._comm.Irecv([self._buf, 1, MPI.BYTE], 0, self._tag)

    @classmethod
    def of_thread(cls) -> Wakeup:
        """The calling thread's Wakeup (created on first use)."""
        wakeup = getattr(cls._local, "wakeup", None)
        if wakeup is None:
            wakeup = cls._local.wakeup = cls()
        return wakeup

    def wait(self, request: Any, status: Any = None) -> bool:
        """Block until mpi4py `request` completes (True; `status` filled) or `fire()` is
        called (False). `request` must not be MPI_REQUEST_NULL."""
        requests = [request, self._recv]
        polls = Wakeup._polls
        if polls is None:
            polls = Wakeup._polls = oversubscribed()
        if not polls:
            index = _MPI.Request.Waitany(requests, status)
        else:
            testany = _MPI.Request.Testany
            while True:
                index, done = testany(requests, status)
                if done:
                    break
                os.sched_yield()
        if index == 0:
            return True
        self._recv = Wakeup._comm.Irecv([self._buf, 1, _MPI.BYTE], 0, self._tag)
        return False

    def fire(self) -> None:
        """End the owner thread's current (or next) `wait` (any thread; returns at once:
        a 1-byte send to self is eager)."""
        Wakeup._comm.Send([b"\x01", 1, _mpi().BYTE], 0, self._tag)


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

    def __init__(self, reqs: list, staged: Sequence[_Staged] = (), *, buffers: Any = None,
                 status: bool = False, check: tuple | None = None) -> None:
        self._reqs = reqs
        self._staged = staged
        # What MPI reads and writes, held until completion: MPI sees only raw addresses.
        self._buffers = buffers
        self._callbacks: list | None = None
        self._done = False
        self._lock = threading.RLock()
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
    def completed(cls, staged: Sequence[_Staged] = ()) -> Request:
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
        about to be started again (`_CheckSlots`)."""
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
                status = _MPI.Status() if self._status else None
                if len(self._reqs) == 1:
                    self._reqs[0].Wait(status)
                elif self._reqs:
                    _MPI.Request.Waitall(self._reqs)
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
                    status = _MPI.Status() if self._status else None
                    if not wakeup.wait(self._reqs[0], status):
                        return False
                else:
                    status = None
                    REQUEST_NULL = _MPI.REQUEST_NULL
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
            MPI = _mpi()
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
                status = _MPI.Status() if self._status else None
                if len(self._reqs) == 1:
                    finished = self._reqs[0].Test(status)
                else:
                    finished = _MPI.Request.Testall(self._reqs)
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
            self.nbytes = status.Get_count(_MPI.BYTE)
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


# --------------------------------------------------------------------------------------
# Communicator


class _CheckSlots:
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
        MPI = _MPI
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


class Communicator:
    """A group of ranks that exchange torch tensors over one MPI communicator.

    Every operation is non-blocking and returns a `Request`; blocking use is
    ``comm.iallreduce(t).wait()``. In-place operations modify the given tensor. Argument
    errors raise ValueError on the calling rank before anything is posted. Where ranks
    might disagree on shapes, dtypes or roots, which MPI would turn into a truncation
    error, corruption or a hang: pass every collective an agreement vector (``check=``,
    `commrt.transports.agreement`; the request then settles with ``agreed`` False instead
    of waiting for ill-matched data), or call `check_uniform` first (blocking).
    """

    def __init__(self, mpi_comm) -> None:
        self.mpi = mpi_comm
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self._check_slots: _CheckSlots | None = None

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size})"

    # -- groups -----------------------------------------------------------------------

    def dup(self) -> Communicator:
        """Collective: a communicator of the same ranks whose messages never match this
        one's (MPI_Comm_dup); release it with `free()`."""
        return Communicator(self.mpi.Dup())

    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """Collective: ranks with the same color form a new communicator, ordered by key.

        A rank passing color None gets None back (MPI_UNDEFINED).
        """
        MPI = _mpi()
        new = self.mpi.Split(MPI.UNDEFINED if color is None else int(color), int(key))
        return None if new == MPI.COMM_NULL else Communicator(new)

    def subgroup(self, ranks: Sequence[int]) -> Communicator | None:
        """Collective over this communicator: a communicator of `ranks` (in this
        communicator's numbering, in that order); None on ranks not listed."""
        ranks = [int(r) for r in ranks]
        for r in ranks:
            self._check_rank(r, "subgroup member")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"subgroup ranks repeat: {ranks}")
        MPI = _mpi()
        group = self.mpi.Get_group().Incl(ranks)
        new = self.mpi.Create(group)
        group.Free()
        return None if new == MPI.COMM_NULL else Communicator(new)

    def create_group(self, ranks: Sequence[int]) -> Communicator:
        """A communicator of `ranks` (this communicator's numbering), created by those
        members alone (MPI_Comm_create_group): the other ranks need not take part.

        The MPI tag is derived from the member list, so groups with different members
        created concurrently never match each other's messages.
        """
        ranks = [int(r) for r in ranks]
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not a member of group {ranks}")
        for r in ranks:
            self._check_rank(r, "group member")
        group = self.mpi.Get_group().Incl(ranks)
        tag = zlib.crc32(repr(ranks).encode()) % 32768  # MPI guarantees tags up to 32767
        try:
            return Communicator(self.mpi.Create_group(group, tag))
        finally:
            group.Free()

    def split_shared_memory(self) -> Communicator:
        """Collective: the ranks of this communicator that share memory (one node)."""
        MPI = _mpi()
        return Communicator(self.mpi.Split_type(MPI.COMM_TYPE_SHARED, self.rank))

    # -- point to point ---------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0, *,
              kind: str = "send") -> Request:
        """Send `tensor`'s bytes to `dest`. Wire bytes: exactly the tensor's bytes."""
        self._check_rank(dest, "destination")
        work, staged = _stage_in(tensor)
        nbytes = _nbytes(work)
        req = self.mpi.Isend([_buf(work, nbytes), nbytes, _mpi().BYTE], dest, tag)
        wire.add(kind, nbytes)
        return Request([req], staged, buffers=work)

    def irecv(self, tensor: torch.Tensor, source: int = ANY_SOURCE, tag: int = ANY_TAG, *,
              kind: str = "recv") -> Request:
        """Receive into `tensor` (a message of at most its size) from `source` (any rank by
        default); after completion `req.source` and `req.nbytes` tell who sent how much."""
        if source != ANY_SOURCE:
            self._check_rank(source, "source")
        work, staged = _stage_out(tensor)
        nbytes = _nbytes(work)
        MPI = _mpi()
        req = self.mpi.Irecv([_buf(work, nbytes), nbytes, MPI.BYTE],
                             MPI.ANY_SOURCE if source == ANY_SOURCE else source,
                             MPI.ANY_TAG if tag == ANY_TAG else tag)
        request = Request([req], staged, buffers=work, status=True)
        request.add_done_callback(lambda: wire.add_received(kind, request.nbytes or 0))
        return request

    # -- collectives ------------------------------------------------------------------

    def iallreduce(self, tensor: torch.Tensor, op: str = "sum", *,
                   kind: str = "all_reduce", check: bytes | None = None) -> Request:
        """In place: every rank ends with the reduction over ranks.
        Wire bytes per rank: 2(P-1)/P * B (B = bytes of the reduced, possibly upcast, data)."""
        mpi_op, datatype, upcast = _mpi_op(op, tensor.dtype)
        if not upcast and tensor.is_cpu and tensor.is_contiguous():
            work, staged = tensor, ()  # (the common case, spared _stage's dtype lookups)
        else:
            work, staged = _stage_out(tensor, reduce=True)
        if self.size == 1:
            return Request.completed(staged)
        n = work.numel()
        B = n * work.element_size()
        token = self._post_check(check)
        req = self.mpi.Iallreduce(_MPI.IN_PLACE, [_MPI.buffer.fromaddress(work.data_ptr(), B),
                                                  n, datatype], mpi_op)
        wire.add(kind, 2 * (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=work, check=token)

    def ibroadcast(self, tensor: torch.Tensor, root: int, *, kind: str = "broadcast",
                   check: bytes | None = None) -> Request:
        """In place: every rank ends with root's tensor. Wire bytes: (P-1)/P * B."""
        self._check_rank(root, "root")
        work, staged = _stage_out(tensor)
        if self.size == 1:
            return Request.completed(staged)
        B = _nbytes(work)
        token = self._post_check(check)
        req = self.mpi.Ibcast([_buf(work, B), B, _mpi().BYTE], root)
        wire.add(kind, (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=work, check=token)

    def ireduce(self, tensor: torch.Tensor, root: int, op: str = "sum", *,
                kind: str = "reduce", check: bytes | None = None) -> Request:
        """In place on root: root ends with the reduction; other ranks' tensors are unchanged.
        Wire bytes: (P-1)/P * B."""
        self._check_rank(root, "root")
        MPI = _mpi()
        work, staged = _stage(tensor, True, self.rank == root)
        mpi_op, datatype, _ = _mpi_op(op, tensor.dtype)
        if self.size == 1:
            return Request.completed(staged)
        B = _nbytes(work)
        spec = [_buf(work, B), work.numel(), datatype]
        token = self._post_check(check)
        if self.rank == root:
            req = self.mpi.Ireduce(MPI.IN_PLACE, spec, mpi_op, root)
        else:
            req = self.mpi.Ireduce(spec, None, mpi_op, root)
        wire.add(kind, (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=work, check=token)

    def iallgather(self, inp: torch.Tensor, out: torch.Tensor, *,
                   kind: str = "all_gather", check: bytes | None = None) -> Request:
        """out = concatenation over ranks of inp (rank-major). out.numel() == P*inp.numel().
        Wire bytes: (P-1)/P * bytes(out)."""
        self._check_same_dtype(inp, out)
        if out.numel() != self.size * inp.numel():
            raise ValueError(f"all_gather output has {out.numel()} elements, expected "
                             f"{self.size} x {inp.numel()}")
        win, sin = _stage_in(inp)
        wout, sout = _stage_out(out)
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(sin + sout)
        # Equal blocks: MPI_Iallgather, without the v-variant's count and offset lists.
        nbytes = _nbytes(win)
        BYTE = _mpi().BYTE
        token = self._post_check(check)
        req = self.mpi.Iallgather([_buf(win, nbytes), nbytes, BYTE],
                                  [_buf(wout, nbytes * self.size), nbytes, BYTE])
        wire.add(kind, (self.size - 1) * nbytes)
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def iallgatherv(self, inp: torch.Tensor, out: torch.Tensor, counts: Sequence[int], *,
                    kind: str = "all_gather", check: bytes | None = None) -> Request:
        """out = concatenation of every rank's inp, rank r contributing counts[r] elements.
        Wire bytes: (P-1)/P * bytes(out)."""
        self._check_same_dtype(inp, out)
        counts = self._check_counts(counts, "all_gather counts")
        if counts[self.rank] != inp.numel() or sum(counts) != out.numel():
            raise ValueError(f"all_gather counts {counts} do not match input {inp.numel()} "
                             f"/ output {out.numel()} elements")
        win, sin = _stage_in(inp)
        wout, sout = _stage_out(out)
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(sin + sout)
        es = inp.element_size()
        bcounts = [c * es for c in counts]
        displs = np.cumsum([0] + bcounts[:-1]).tolist()
        BYTE = _mpi().BYTE
        token = self._post_check(check)
        req = self.mpi.Iallgatherv([_buf(win), bcounts[self.rank], BYTE],
                                   [_buf(wout), bcounts, displs, BYTE])
        wire.add(kind, (self.size - 1) * _nbytes(out) // self.size)
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def ireduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, op: str = "sum", *,
                        kind: str = "reduce_scatter", check: bytes | None = None) -> Request:
        """out = rank r's block of the reduction of inp; inp.numel() == P*out.numel().
        Wire bytes: (P-1)/P * B(inp) (B after any upcast)."""
        self._check_same_dtype(inp, out)
        n = out.numel()
        if inp.numel() != self.size * n:
            raise ValueError(f"reduce_scatter input has {inp.numel()} elements, expected "
                             f"{self.size} x {n}")
        win, sin = _stage_in(inp, reduce=True)
        wout, sout = _stage_out(out, reduce=True)
        mpi_op, dt, _ = _mpi_op(op, inp.dtype)
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(sin + sout)
        B = _nbytes(win)
        token = self._post_check(check)
        req = self.mpi.Ireduce_scatter_block([_buf(win, B), n, dt],
                                             [_buf(wout, B // self.size), n, dt], mpi_op)
        wire.add(kind, (self.size - 1) * B // self.size)
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def ialltoall(self, inp: torch.Tensor, out: torch.Tensor, *,
                  kind: str = "all_to_all") -> Request:
        """Block r of inp goes to rank r; out's block s comes from rank s (equal blocks)."""
        if inp.numel() % self.size or out.numel() != inp.numel():
            raise ValueError(f"all_to_all needs input and output of equal size divisible by "
                             f"{self.size}, got {inp.numel()} and {out.numel()}")
        counts = [inp.numel() // self.size] * self.size
        return self.ialltoallv(inp, out, counts, counts, kind=kind)

    def ialltoallv(self, inp: torch.Tensor, out: torch.Tensor, send_counts: Sequence[int],
                   recv_counts: Sequence[int], *, kind: str = "all_to_all",
                   check: bytes | None = None) -> Request:
        """Uneven all-to-all: send_counts[r] elements of inp (in order) go to rank r,
        recv_counts[s] elements from rank s land in out (in order).
        Wire bytes: the bytes addressed to other ranks."""
        self._check_same_dtype(inp, out)
        send_counts = self._check_counts(send_counts, "all_to_all send counts")
        recv_counts = self._check_counts(recv_counts, "all_to_all recv counts")
        if sum(send_counts) != inp.numel():
            raise ValueError(f"all_to_all send counts {send_counts} add up to "
                             f"{sum(send_counts)}, but the input has {inp.numel()} elements")
        if sum(recv_counts) != out.numel():
            raise ValueError(f"all_to_all recv counts {recv_counts} add up to "
                             f"{sum(recv_counts)}, but the output has {out.numel()} elements")
        win, sin = _stage_in(inp)
        wout, sout = _stage_out(out)
        es = inp.element_size()
        sb = [c * es for c in send_counts]
        rb = [c * es for c in recv_counts]
        sd = np.cumsum([0] + sb[:-1]).tolist()
        rd = np.cumsum([0] + rb[:-1]).tolist()
        BYTE = _mpi().BYTE
        token = self._post_check(check)
        req = self.mpi.Ialltoallv([_buf(win), sb, sd, BYTE], [_buf(wout), rb, rd, BYTE])
        wire.add(kind, sum(sb) - sb[self.rank])
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def igather(self, inp: torch.Tensor, out: torch.Tensor | None, root: int, *,
                kind: str = "gather", check: bytes | None = None) -> Request:
        """Root's out = concatenation of every rank's inp (out is ignored elsewhere).
        Wire bytes: bytes(inp) on every rank but root."""
        self._check_rank(root, "root")
        win, staged = _stage_in(inp)
        BYTE = _mpi().BYTE
        B = _nbytes(win)
        recv = None
        if self.rank == root:
            if out is None or out.numel() != self.size * inp.numel():
                raise ValueError(f"gather root needs an output of {self.size} x {inp.numel()} "
                                 "elements")
            self._check_same_dtype(inp, out)
            wout, sout = _stage_out(out)
            staged += sout
            recv = [_buf(wout), B, BYTE]
        token = self._post_check(check)
        req = self.mpi.Igather([_buf(win), B, BYTE], recv, root)
        wire.add(kind, 0 if self.rank == root else B)
        return Request([req], staged, buffers=(inp, out), check=token)

    def iscatter(self, inp: torch.Tensor | None, out: torch.Tensor, root: int, *,
                 kind: str = "scatter", check: bytes | None = None) -> Request:
        """Every rank's out = block r of root's inp (inp is ignored elsewhere).
        Wire bytes: (P-1) * bytes(out) on root, 0 elsewhere."""
        self._check_rank(root, "root")
        wout, staged = _stage_out(out)
        BYTE = _mpi().BYTE
        B = _nbytes(wout)
        send = None
        if self.rank == root:
            if inp is None or inp.numel() != self.size * out.numel():
                raise ValueError(f"scatter root needs an input of {self.size} x {out.numel()} "
                                 "elements")
            self._check_same_dtype(inp, out)
            win, sin = _stage_in(inp)
            staged += sin
            send = [_buf(win), B, BYTE]
        token = self._post_check(check)
        req = self.mpi.Iscatter(send, [_buf(wout), B, BYTE], root)
        wire.add(kind, (self.size - 1) * B if self.rank == root else 0)
        return Request([req], staged, buffers=(inp, out), check=token)

    def ibarrier(self, *, check: bytes | None = None) -> Request:
        token = self._post_check(check)
        return Request([self.mpi.Ibarrier()], check=token)

    def iagree(self, check: bytes) -> Request:
        """Post agreement vector `check` alone: a request that completes when every rank
        has posted its own; then `agreed` says whether all were equal (see Request)."""
        if self.size == 1:
            req = Request.completed()
            return req
        return Request([], check=self._post_check(check))

    def _post_check(self, check: bytes | None) -> tuple | None:
        """Post agreement vector `check` (its bytes: int64 values, see
        `commrt.transports.agreement`) as a MAX-allreduce, just ahead of an operation's
        data; None for no check (or a single rank). Wire bytes: len(check) (counted as
        control traffic, not under a kind)."""
        if check is None or self.size == 1:
            return None
        if len(check) == _CheckSlots.NBYTES:
            slots = self._check_slots
            if slots is None:  # (collective: every rank posts its first check in step)
                slots = self._check_slots = _CheckSlots(self.mpi)
            return slots.start(check)
        result = bytearray(check)  # one per check: several may be in flight at once
        return (self.mpi.Iallreduce(_MPI.IN_PLACE, [result, len(check) >> 3, _MPI.INT64_T],
                                    _MPI.MAX), result, check, None)

    def barrier(self) -> None:
        self.mpi.Barrier()

    # -- Python objects and agreement -------------------------------------------------

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """Pickled broadcast (not counted: control traffic, not tensor data)."""
        return self.mpi.bcast(obj, root)

    def allgather_object(self, obj: Any) -> list:
        """Pickled all-gather (not counted: control traffic)."""
        return self.mpi.allgather(obj)

    def allreduce_object(self, obj: Any) -> Any:
        """Pickled sum over ranks (numbers or numpy arrays; not counted: control traffic)."""
        return self.mpi.allreduce(obj)

    def check_uniform(self, values: Sequence[int], what: str) -> None:
        """Collective: raise ValueError on every rank unless all ranks passed equal values.

        Costs one small allreduce (`commrt.transports.agreement`, the project's one
        agreement mechanism). Every rank must pass the same number of values. Used before
        collectives whose ranks might disagree on shapes or dtypes, which MPI would
        otherwise turn into a truncation error, corruption or a hang.
        """
        from .agreement import check_uniform

        check_uniform(self, values, what)

    # -- lifetime ---------------------------------------------------------------------

    def congruent(self, other: Communicator) -> bool:
        """Whether `other` holds the same ranks in the same order (the same communicator or
        a duplicate of it)."""
        MPI = _mpi()
        return self.mpi.Compare(other.mpi) in (MPI.IDENT, MPI.CONGRUENT)

    def free(self) -> None:
        """Release the MPI communicator (collective over its ranks; not for the world)."""
        if self._check_slots is not None:
            self._check_slots.free()
            self._check_slots = None
        self.mpi.Free()

    def abort(self, code: int = 1) -> None:
        """End every process of the job at once (MPI_Abort), e.g. after a hung collective."""
        self.mpi.Abort(code)

    # -- argument checks --------------------------------------------------------------

    def _check_rank(self, r: int, what: str) -> None:
        if not 0 <= r < self.size:
            raise ValueError(f"{what} rank {r} is out of range for a group of {self.size} ranks")

    def _check_counts(self, counts: Sequence[int], what: str) -> list[int]:
        counts = [int(c) for c in counts]
        if len(counts) != self.size or any(c < 0 for c in counts):
            raise ValueError(f"{what} must be {self.size} non-negative numbers, got {counts}")
        return counts

    @staticmethod
    def _check_same_dtype(a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dtype != b.dtype:
            raise ValueError(f"input dtype {a.dtype} and output dtype {b.dtype} differ")


def mpirun_executable() -> str:
    """The `mpirun` beside this interpreter (the PyPI mpich wheel's), else one on PATH."""
    import shutil
    from pathlib import Path

    here = Path(sys.executable).with_name("mpirun")
    if here.exists():
        return str(here)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpirun found: install the MPI extra (pip install -e '.[mpi]') "
                           "or a system MPI")
    return found


# --------------------------------------------------------------------------------------
# The world, and ending the whole job on an error

_world: Communicator | None = None
_world_lock = threading.Lock()


def world() -> Communicator:
    """The communicator of every rank of the job (MPI.COMM_WORLD), initialising MPI.

    With more than one rank, an uncaught exception on any rank aborts the whole job
    (`install_abort_on_error`) unless COMMRT_ABORT_ON_ERROR=0.
    """
    global _world
    if _world is None:
        with _world_lock:
            if _world is None:
                comm = Communicator(_mpi().COMM_WORLD)
                if comm.size > 1 and os.environ.get("COMMRT_ABORT_ON_ERROR", "1") != "0":
                    install_abort_on_error()
                _world = comm
    return _world


_abort_installed = False
ABORT_GRACE_S = 0.5


def install_abort_on_error() -> None:
    """Make an uncaught exception on this rank (main thread or any other) print its
    traceback and then MPI_Abort the whole job, so the other ranks never wait forever in
    a collective this rank will not join."""
    global _abort_installed
    if _abort_installed:
        return
    _abort_installed = True
    previous_hook = sys.excepthook

    def multi_rank() -> bool:
        MPI = _mpi()
        return MPI.Is_initialized() and not MPI.Is_finalized() and \
            MPI.COMM_WORLD.Get_size() > 1

    def report_and_abort(header: str, exc_type, exc, tb) -> None:
        # Written to the process's real stderr: torch.distributed's own excepthook redirects
        # sys.stderr into a buffer that it prints only after this hook returns, and an
        # abort never returns.
        MPI = _mpi()
        text = header + "".join(traceback.format_exception(exc_type, exc, tb))
        prefix = f"[rank{MPI.COMM_WORLD.Get_rank()}] "
        out = sys.__stderr__
        out.write("".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")))
        out.flush()
        sys.stdout.flush()
        # The launcher forwards each rank's output asynchronously and stops once the abort
        # kills the job: give it a moment, or the message that says what failed is lost.
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(1)

    def excepthook(exc_type, exc, tb):
        if multi_rank():
            report_and_abort("", exc_type, exc, tb)
        previous_hook(exc_type, exc, tb)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        header = f"commrt: uncaught exception in thread {args.thread.name}:\n"
        if multi_rank():
            report_and_abort(header, args.exc_type, args.exc_value, args.exc_traceback)
        sys.stderr.write(header)
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
