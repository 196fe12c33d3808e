"""The `commrt` torch.distributed backend: every c10d collective over the MPI transport.

``import commrt`` registers the backend (idempotently), after which, under ``mpirun -n N``::

    dist.init_process_group("commrt")      # no MASTER_ADDR/RANK/... needed

works with no environment set by hand: rank and world size come from MPI, and the
rendezvous store (a TCPStore, which torch requires) is created by rank 0 on a free port
that is broadcast over MPI. Under ``torchrun`` (no MPI launcher) init fails at once with a
one-line RuntimeError that says to launch with mpirun.

Design
------
- `CommrtProcessGroup` subclasses ``torch.distributed.ProcessGroup`` (c10d's ``Backend``
  has no Python constructor in torch 2.11-2.14). Python callers reach its methods
  directly; C++ callers (the DDP reducer, DDP's parameter verification and broadcast,
  functional collectives) reach them through the pybind trampoline.
- Every operation posts non-blocking MPI requests (`commrt.transports`) and returns a
  `CommrtWork`. ``wait()`` waits on those requests; ``get_future()`` returns a
  ``torch.futures.Future`` completed when they finish.
- Futures are completed in the order their operations were issued, by a lazily started
  daemon thread that polls with exponential back-off (50 us to 2 ms) while something is
  pending and sleeps on a condition variable otherwise (no core burnt while idle).
  Callbacks chained on a future (DDP comm hooks such as PowerSGD issue more collectives
  inside them) therefore run in the same order on every rank. Before a thread issues a
  new collective it first completes every pending future (and so runs the callbacks
  chained on them), so a collective issued inside a callback can never overtake, on one
  rank but not another, a collective issued by the training thread: MPI matches
  collectives by issue order. Futures requested inside a callback complete eagerly.
- Validation (item "bad input"): before each collective the ranks agree, with one small
  allreduce, that their arguments match (shapes, dtypes, reduction, root); a mismatch or
  a local argument error raises ValueError on *every* rank instead of a hang or silent
  corruption. ``COMMRT_VALIDATE=0`` skips that allreduce (local checks still raise, but
  only on the rank that made the mistake).

Reductions: SUM, AVG, MAX, MIN, PRODUCT, BAND, BOR, BXOR. AVG is SUM then a division
by the group size; it is defined for floating-point (and complex) tensors only: integer
and bool AVG raise ValueError (rounding would be a silent surprise). PREMUL_SUM is not
supported. float16/bfloat16 are reduced in float32 by the transport.

Wire bytes per rank (counted in ``commrt.transports.wire`` under the op's name, P ranks,
B bytes of the tensor reduced / broadcast, S bytes of the whole gathered array):
all_reduce 2(P-1)/P*B; broadcast and reduce (P-1)/P*B; all_gather(_into_tensor) and
reduce_scatter(_tensor) (P-1)/P*S; all_to_all(_single) the bytes addressed to other ranks;
gather: the rank's block (0 on root); scatter: (P-1) blocks on root; send: its bytes.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import socket
import threading
import time
import zlib
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from commrt import transports as T

BACKEND_NAME = "commrt"
SUPPORTED_DEVICES = ("cpu", "cuda")

__all__ = ["BACKEND_NAME", "CommrtProcessGroup", "CommrtWork", "mpi_tcp_store", "register",
           "launched_by_mpi", "validation_enabled"]

_RED = dist.ReduceOp.RedOpType
_REDUCTIONS = {
    _RED.SUM: "sum", _RED.AVG: "sum", _RED.MAX: "max", _RED.MIN: "min",
    _RED.PRODUCT: "product", _RED.BAND: "band", _RED.BOR: "bor", _RED.BXOR: "bxor",
}
_MPI_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                     "PMIX_RANK", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD")


def validation_enabled() -> bool:
    """Whether collectives check argument agreement across ranks (COMMRT_VALIDATE != 0)."""
    return os.environ.get("COMMRT_VALIDATE", "1").strip().lower() not in ("0", "false", "no")


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (mpirun/mpiexec/srun with PMI)."""
    return any(k in os.environ for k in _MPI_LAUNCHER_ENV)


# --------------------------------------------------------------------------------------
# Ordered completion of futures


class _Completer:
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

    def enqueue(self, work: "CommrtWork") -> None:
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
        if not head._finish_requests(blocking):
            return False
        self.local.active = True
        try:
            head._resolve_future()
        finally:
            self.local.active = False
            self.queue.popleft()
        return True

    def settle(self, upto: "CommrtWork | None" = None) -> None:
        """Complete queued futures in order: all of them, or up to and including `upto`."""
        while self.queue:
            if upto is not None and upto._future_resolved:
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


_completer = _Completer()


# --------------------------------------------------------------------------------------
# Work


def _timeout_seconds(timeout: Any) -> float:
    """0 (wait forever) for None/0/negative, else seconds."""
    if timeout is None:
        return 0.0
    if isinstance(timeout, timedelta):
        return max(timeout.total_seconds(), 0.0)
    return max(float(timeout), 0.0)


_Work_init = dist._Work.__init__
_new_lock = threading.Lock


class CommrtWork(dist._Work):
    """A posted operation: MPI requests, what to do after they complete, and the result.

    `wait()` blocks until the requests complete and the finishing step (copy out of a
    staging buffer, AVG's division) has run, then re-raises any error of the operation.
    `get_future()` returns a Future whose value is `result()` (the output tensors).
    """

    # Slots: a Work is created per call, and attribute writes on a pybind object with a
    # __dict__ cost several times more (this is on the small-message hot path).
    __slots__ = ("_requests", "_result", "_finish", "_op", "_finished", "_error", "_future",
                 "_future_resolved", "_queued", "_lock")

    def __init__(self, requests: Sequence[Any], result: list[torch.Tensor],
                 finish: Callable[[], None] | None = None, op: str = "") -> None:
        _Work_init(self)
        self._requests = requests
        self._result = result
        self._finish = finish
        self._op = op
        self._finished = False
        self._error: BaseException | None = None
        self._future: torch.futures.Future | None = None
        self._future_resolved = False
        self._queued = False
        self._lock = _new_lock()

    def __repr__(self) -> str:
        return f"CommrtWork({self._op}, completed={self._finished})"

    # -- completion -------------------------------------------------------------------

    def _finish_requests(self, blocking: bool) -> bool:
        if self._finished:
            return True
        try:
            if blocking:
                for req in self._requests:
                    req.wait()
            elif not all(req.test() for req in self._requests):
                return False
        except BaseException as exc:  # an MPI error: delivered to wait() and the future
            self._fail(exc)
            return True
        with self._lock:
            if not self._finished:
                try:
                    if self._finish is not None:
                        self._finish()
                except BaseException as exc:
                    self._error = exc
                self._finished = True
        return True

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if not self._finished:
                self._error = exc
                self._finished = True

    def _resolve_future(self) -> None:
        fut = self._future
        self._future_resolved = True
        if fut is None or fut.done():
            return
        if self._error is not None:
            fut.set_exception(self._error)
        else:
            fut.set_result(self._result)

    # -- the c10d Work interface --------------------------------------------------------

    def wait(self, timeout: Any = None) -> bool:
        seconds = _timeout_seconds(timeout)
        if self._queued and not _completer.in_callback():
            _completer.settle(upto=self)
        elif seconds > 0:
            deadline = time.monotonic() + seconds
            delay = 20e-6
            while not self._finish_requests(blocking=False):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"commrt {self._op} timed out after {seconds:.1f} s "
                                       "(a rank did not join the collective?)")
                time.sleep(delay)
                delay = min(2 * delay, 1e-3)
        else:
            self._finish_requests(blocking=True)
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future:
        if self._future is not None:
            return self._future
        fut = torch.futures.Future()
        self._future = fut
        if self._finished or _completer.in_callback():
            # Inside a callback, complete at once: keeps the callback's collectives in
            # issue order on every rank (the FIFO queue is being drained by this thread).
            self._finish_requests(blocking=True)
            self._resolve_future()
        else:
            self._queued = True
            _completer.enqueue(self)
        return fut

    def is_completed(self) -> bool:
        return self._finish_requests(blocking=False)

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._result

    def synchronize(self) -> None:
        self.wait()

    def source_rank(self) -> int:
        self.wait()
        source = getattr(self._requests[0], "source", None) if self._requests else None
        if source is None:
            raise RuntimeError("source_rank() is only defined for a receive from any source")
        return int(source)

    _source_rank = source_rank

    def block_current_stream(self) -> None:
        self.wait()


def _completed_work(result: list[torch.Tensor], op: str) -> CommrtWork:
    work = CommrtWork((), result, None, op)
    work._finished = True
    return work


# --------------------------------------------------------------------------------------
# Argument checks


def _check_tensor(t: Any, op: str, what: str = "tensor") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"commrt {op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cpu or t.is_cuda):  # (t.device.type builds a device object: slower)
        raise ValueError(f"commrt {op}: {what} is on device {t.device}; the commrt backend "
                         f"supports {' and '.join(SUPPORTED_DEVICES)} tensors")
    if t.layout != torch.strided:
        raise ValueError(f"commrt {op}: {what} has layout {t.layout}; only dense (strided) "
                         "tensors are supported")
    return t


def _single(tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise ValueError(f"commrt {op}: expected exactly one tensor per rank, got {len(tensors)}")
    return _check_tensor(tensors[0], op)


_reduction_cache: dict[tuple, tuple[str, bool]] = {}


def _reduction(opts: Any, dtype: torch.dtype, op: str) -> tuple[str, bool]:
    """(transport reduction name, whether to divide by the group size) for opts.reduceOp."""
    red_op = getattr(opts, "reduceOp", None)
    kind = _RED.SUM if red_op is None else getattr(red_op, "op", red_op)
    name = _REDUCTIONS.get(kind)
    if name is None:
        raise ValueError(f"commrt {op}: reduction {kind} is not supported (supported: SUM, "
                         "AVG, MAX, MIN, PRODUCT, BAND, BOR, BXOR)")
    average = kind == _RED.AVG
    if average and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"commrt {op}: AVG is defined for floating-point tensors only, got "
                         f"{dtype}; use SUM and divide (choose the rounding yourself)")
    if name in ("band", "bor", "bxor") and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"commrt {op}: bitwise reduction {name.upper()} needs an integer or "
                         f"bool tensor, got {dtype}")
    if name in ("max", "min") and dtype.is_complex:
        raise ValueError(f"commrt {op}: {name.upper()} is not defined for complex tensors")
    return name, average


def _same_dtype(tensors: Sequence[torch.Tensor], dtype: torch.dtype, op: str) -> None:
    for t in tensors:
        if t.dtype != dtype:
            raise ValueError(f"commrt {op}: tensors of dtypes {dtype} and {t.dtype} mixed in "
                             "one call")


def _flat_copy(tensors: Sequence[torch.Tensor], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1) for t in tensors])


def _scatter_back(flat: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    offset = 0
    for out in outputs:
        n = out.numel()
        out.copy_(flat[offset:offset + n].view(out.shape))
        offset += n


def _unaliased(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`inp`, or a copy of it when it shares memory with `out`: MPI forbids aliased send and
    receive buffers, and FSDP2 all-gathers from a view into its own output."""
    if inp.numel() and out.numel() and \
            inp.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        return inp.clone()
    return inp


def _row_numel(t: torch.Tensor) -> int:
    """Elements per index of dim 0 (all_to_all_single splits count rows)."""
    return math.prod(t.shape[1:]) if t.dim() else 1


def _group_rank_arg(r: Any, size: int, op: str, what: str) -> int:
    r = int(r)
    if not 0 <= r < size:
        raise ValueError(f"commrt {op}: {what} rank {r} is out of range for a group of "
                         f"{size} ranks")
    return r


_AGREE_SLOTS = 8
_codes: dict[Any, int] = {}


def _code(value: Any) -> int:
    """An int standing for one element of a collective's signature, equal on every rank."""
    if type(value) is int:
        return value
    code = _codes.get(value)
    if code is None:
        code = zlib.crc32(repr(value).encode()) & 0x7FFFFFFF
        if isinstance(value, (str, bool, torch.dtype)):
            _codes[value] = code
    return code


_encoded_signatures: dict[tuple, np.ndarray] = {}


@functools.cache
def _MPI_IN_PLACE() -> Any:
    from mpi4py import MPI
    return MPI.IN_PLACE


@functools.cache
def _MPI_MAX() -> Any:
    from mpi4py import MPI
    return MPI.MAX


def _encode_signature(signature: tuple) -> np.ndarray:
    """(flag 0, codes..., zero padding, then all of it negated): what `_agree` reduces."""
    n = _AGREE_SLOTS
    codes = [_code(v) for v in signature]
    if len(codes) > n - 1:
        codes[n - 2:] = [zlib.crc32(repr(codes[n - 2:]).encode())]
    codes.extend([0] * (n - 1 - len(codes)))
    encoded = np.zeros(2 * n, dtype=np.int64)
    encoded[1:n] = codes
    encoded[n:] = -encoded[:n]
    return encoded


class _Prepared:
    """What a collective will post once the ranks agree on its arguments."""

    __slots__ = ("signature", "launch")

    def __init__(self, signature: tuple, launch: Callable[[], CommrtWork]) -> None:
        self.signature = signature
        self.launch = launch


# --------------------------------------------------------------------------------------
# The process group


class CommrtProcessGroup(dist.ProcessGroup):
    """A torch.distributed ProcessGroup whose collectives run on a commrt `Communicator`.

    `communicator` is the transport Communicator underneath (what
    `commrt.transports.for_group(pg)` returns); `_get_backend(device)` returns the group
    itself so that lookups through c10d's backend accessor find it too.
    """

    def __init__(self, communicator: T.Communicator, *, timeout: timedelta | None = None,
                 group_name: str = "", group_desc: str = "") -> None:
        super().__init__(communicator.rank, communicator.size)
        self.communicator = communicator
        self._rank = communicator.rank
        self._size = communicator.size
        self._timeout = timeout
        self._group_name = group_name
        self._group_desc = group_desc
        self._validate = validation_enabled()
        self._coalescing: list[CommrtWork] | None = None

        self._agree_buf = np.zeros(2 * _AGREE_SLOTS, dtype=np.int64)

    def __repr__(self) -> str:
        return f"CommrtProcessGroup(rank={self._rank}, size={self._size}, name={self._group_name!r})"

    # -- identity ---------------------------------------------------------------------

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def name(self) -> str:
        return BACKEND_NAME

    def getBackendName(self) -> str:  # noqa: N802 (c10d's name)
        return BACKEND_NAME

    def _get_backend_name(self) -> str:
        return BACKEND_NAME

    @property
    def group_name(self) -> str:
        return self._group_name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    def _set_group_name(self, name: str) -> None:
        self._group_name = name
        super()._set_group_name(name)

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc
        super()._set_group_desc(desc)

    def _get_backend(self, device: Any = None) -> "CommrtProcessGroup":
        if device is not None and torch.device(device).type not in SUPPORTED_DEVICES:
            raise ValueError(f"commrt backend has no implementation for device {device}")
        return self

    @property
    def supports_coalescing(self) -> bool:
        return True

    @property
    def supports_splitting(self) -> bool:
        return False

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    def shutdown(self) -> None:
        _completer.settle()

    def abort(self) -> None:
        T.world().mpi.Abort(1)

    # -- agreement and the common path --------------------------------------------------

    def _agree(self, op: str, signature: tuple | None, error: Exception | None) -> None:
        """Collective: raise on every rank if any rank's arguments failed a local check or
        the ranks' signatures differ. One allreduce (MAX) of _AGREE_SLOTS int64 and their
        negations; the slot count is fixed, so ranks that even disagree on *which*
        collective they call still match in MPI and are told so."""
        if not self._validate or self._size == 1:
            if error is not None:
                raise error
            return
        n = _AGREE_SLOTS
        if error is not None:
            buf = self._agree_buf
            buf[:] = 0
            buf[0] = 1
            expected = None
        else:
            # Training loops repeat a handful of signatures: encode each once.
            expected = _encoded_signatures.get(signature)
            if expected is None:
                expected = _encode_signature(signature)
                if len(_encoded_signatures) < 4096:
                    _encoded_signatures[signature] = expected
            buf = self._agree_buf
            buf[:] = expected
        self._agree_allreduce(buf)
        if error is not None:
            raise error
        # MAX of (codes, -codes) equals this rank's (codes, -codes) iff every rank agrees.
        if expected is None or buf.tobytes() != expected.tobytes():
            if buf[0] != 0:
                raise ValueError(f"commrt {op}: another rank rejected its arguments for this "
                                 f"collective (see its error); this rank had {signature}")
            raise ValueError(f"commrt {op}: the ranks disagree on the tensors' shapes, "
                             f"dtypes, reduction or root; this rank has {signature}")

    def _agree_allreduce(self, buf: Any) -> None:
        self.communicator.mpi.Allreduce(_MPI_IN_PLACE(), buf, op=_MPI_MAX())

    def _run(self, op: str, prepare: Callable[[], _Prepared]) -> CommrtWork:
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        try:
            prepared = prepare()
            error = None
        except (ValueError, TypeError) as exc:
            prepared, error = None, exc
        self._agree(op, None if prepared is None else prepared.signature, error)
        work = prepared.launch()
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    # -- reductions -------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        # The hot path of small messages: no closures, cached reduction lookup.
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        error = None
        try:
            t = _single(tensors, "all_reduce")
            dtype = t.dtype
            key = (_RED.SUM if opts is None else opts.reduceOp.op, dtype)
            red_avg = _reduction_cache.get(key)
            if red_avg is None:
                red_avg = _reduction_cache[key] = _reduction(opts, dtype, "all_reduce")
            red, average = red_avg
        except (ValueError, TypeError) as exc:
            error = exc
        if self._validate and self._size > 1 or error is not None:
            self._agree("all_reduce", None if error else ("all_reduce", t.numel(), dtype, red,
                                                          average), error)
        req = self.communicator.iallreduce(t, red, kind="all_reduce")
        size = self._size
        work = CommrtWork((req,), [t], (lambda: t.div_(size)) if average and size > 1 else None,
                          "all_reduce")
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            ts = [_check_tensor(t, "all_reduce_coalesced") for t in tensors]
            if not ts:
                return _Prepared(("all_reduce_coalesced",), lambda: _completed_work([], "a"))
            dtype = ts[0].dtype
            _same_dtype(ts, dtype, "all_reduce_coalesced")
            red, average = _reduction(opts, dtype, "all_reduce_coalesced")
            sig = ("all_reduce_coalesced", dtype, red, average, tuple(t.numel() for t in ts))
            return _Prepared(sig, lambda: self._post_allreduce(ts, red, average,
                                                               "all_reduce_coalesced"))
        return self._run("all_reduce_coalesced", prepare)

    def _post_allreduce(self, ts: list[torch.Tensor], red: str, average: bool,
                        op: str) -> CommrtWork:
        size = self._size
        if len(ts) == 1:
            t = ts[0]
            req = self.communicator.iallreduce(t, red, kind="all_reduce")
            finish = (lambda: t.div_(size)) if average and size > 1 else None
            return CommrtWork((req,), ts, finish, op)
        flat = _flat_copy(ts, ts[0].dtype, ts[0].device)
        req = self.communicator.iallreduce(flat, red, kind="all_reduce")

        def finish() -> None:
            if average and size > 1:
                flat.div_(size)
            _scatter_back(flat, ts)
        return CommrtWork((req,), ts, finish, op)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            t = _single(tensors, "reduce")
            red, average = _reduction(opts, t.dtype, "reduce")
            root = _group_rank_arg(getattr(opts, "rootRank", 0), self._size, "reduce", "root")
            sig = ("reduce", t.numel(), t.dtype, red, average, root)

            def launch() -> CommrtWork:
                req = self.communicator.ireduce(t, root, red)
                finish = None
                if average and self._rank == root and self._size > 1:
                    finish = lambda: t.div_(self._size)  # noqa: E731
                return CommrtWork((req,), [t], finish, "reduce")
            return _Prepared(sig, launch)
        return self._run("reduce", prepare)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            t = _single(tensors, "broadcast")
            root = _group_rank_arg(getattr(opts, "rootRank", 0), self._size, "broadcast",
                                   "root")
            sig = ("broadcast", t.numel(), t.dtype, root)
            return _Prepared(sig, lambda: CommrtWork(
                (self.communicator.ibroadcast(t, root),), [t], None, "broadcast"))
        return self._run("broadcast", prepare)

    # -- gathers and scatters ---------------------------------------------------------

    def _prepare_allgather(self, outputs: list[torch.Tensor], inp: torch.Tensor,
                           op: str) -> tuple[tuple, Callable[[], CommrtWork]]:
        inp = _check_tensor(inp, op, "input")
        outputs = [_check_tensor(o, op, "output") for o in outputs]
        if len(outputs) != self._size:
            raise ValueError(f"commrt {op}: the output list has {len(outputs)} tensors, "
                             f"expected one per rank ({self._size})")
        _same_dtype(outputs, inp.dtype, op)
        counts = [o.numel() for o in outputs]
        if counts[self._rank] != inp.numel():
            raise ValueError(f"commrt {op}: the input has {inp.numel()} elements but this "
                             f"rank's output slot has {counts[self._rank]}")
        sig = (op, inp.dtype, tuple(counts))

        def launch() -> CommrtWork:
            flat = torch.empty(sum(counts), dtype=inp.dtype, device=inp.device)
            req = self.communicator.iallgatherv(inp, flat, counts,
                                                kind="all_gather")
            return CommrtWork((req,), outputs, lambda: _scatter_back(flat, outputs), op)
        return sig, launch

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            if len(output_tensors) != 1 or len(input_tensors) != 1:
                raise ValueError("commrt all_gather: expected one input tensor and one output "
                                 "list per rank")
            sig, launch = self._prepare_allgather(output_tensors[0], input_tensors[0],
                                                  "all_gather")

            def launch_list() -> CommrtWork:
                work = launch()
                work._result = output_tensors
                return work
            return _Prepared(sig, launch_list)
        return self._run("all_gather", prepare)

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            input_list: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            if len(output_lists) != len(input_list):
                raise ValueError(f"commrt all_gather_coalesced: {len(output_lists)} output "
                                 f"lists for {len(input_list)} inputs")
            parts = [self._prepare_allgather(o, i, "all_gather_coalesced")
                     for o, i in zip(output_lists, input_list)]
            sig = tuple(p[0] for p in parts)
            return _Prepared(sig, lambda: self._combine([p[1]() for p in parts], output_lists,
                                                        "all_gather_coalesced"))
        return self._run("all_gather_coalesced", prepare)

    def _prepare_allgather_base(self, output: torch.Tensor, inp: torch.Tensor,
                                op: str) -> tuple[tuple, Callable[[], CommrtWork]]:
        inp = _check_tensor(inp, op, "input")
        output = _check_tensor(output, op, "output")
        if output.dtype != inp.dtype:
            raise ValueError(f"commrt {op}: input dtype {inp.dtype} and output dtype "
                             f"{output.dtype} differ")
        if output.numel() != self._size * inp.numel():
            raise ValueError(f"commrt {op}: the output has {output.numel()} elements, "
                             f"expected world size {self._size} x input {inp.numel()}")
        sig = (op, inp.dtype, inp.numel())
        return sig, lambda: CommrtWork(
            (self.communicator.iallgather(_unaliased(inp, output), output, kind="all_gather"),),
            [output], None, op)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            return _Prepared(*self._prepare_allgather_base(output, input,
                                                           "all_gather_into_tensor"))
        return self._run("all_gather_into_tensor", prepare)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor],
                                    inputs: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            if len(outputs) != len(inputs):
                raise ValueError(f"commrt all_gather_into_tensor_coalesced: {len(outputs)} "
                                 f"outputs for {len(inputs)} inputs")
            parts = [self._prepare_allgather_base(o, i, "all_gather_into_tensor_coalesced")
                     for o, i in zip(outputs, inputs)]
            return _Prepared(tuple(p[0] for p in parts), lambda: self._combine(
                [p[1]() for p in parts], list(outputs), "all_gather_into_tensor_coalesced"))
        return self._run("all_gather_into_tensor_coalesced", prepare)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            inp = _single(input_tensors, "gather")
            root = _group_rank_arg(getattr(opts, "rootRank", 0), self._size, "gather", "root")
            outs: list[torch.Tensor] = []
            if self._rank == root:
                if len(output_tensors) != 1 or len(output_tensors[0]) != self._size:
                    raise ValueError(f"commrt gather: the root needs a list of {self._size} "
                                     "output tensors")
                outs = [_check_tensor(o, "gather", "output") for o in output_tensors[0]]
                _same_dtype(outs, inp.dtype, "gather")
                for o in outs:
                    if o.numel() != inp.numel():
                        raise ValueError(f"commrt gather: output tensors of {o.numel()} "
                                         f"elements for inputs of {inp.numel()}")
            elif output_tensors and any(output_tensors):
                raise ValueError("commrt gather: only the root passes output tensors")
            sig = ("gather", inp.dtype, inp.numel(), root)

            def launch() -> CommrtWork:
                flat = None
                if self._rank == root:
                    flat = torch.empty(self._size * inp.numel(), dtype=inp.dtype,
                                       device=inp.device)
                req = self.communicator.igather(inp, flat, root)
                finish = (lambda: _scatter_back(flat, outs)) if flat is not None else None
                return CommrtWork((req,), outs, finish, "gather")
            return _Prepared(sig, launch)
        return self._run("gather", prepare)

    def scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            out = _single(output_tensors, "scatter")
            root = _group_rank_arg(getattr(opts, "rootRank", 0), self._size, "scatter", "root")
            ins: list[torch.Tensor] = []
            if self._rank == root:
                if len(input_tensors) != 1 or len(input_tensors[0]) != self._size:
                    raise ValueError(f"commrt scatter: the root needs a list of {self._size} "
                                     "input tensors")
                ins = [_check_tensor(i, "scatter", "input") for i in input_tensors[0]]
                _same_dtype(ins, out.dtype, "scatter")
                for i in ins:
                    if i.numel() != out.numel():
                        raise ValueError(f"commrt scatter: input tensors of {i.numel()} "
                                         f"elements for outputs of {out.numel()}")
            elif input_tensors and any(input_tensors):
                raise ValueError("commrt scatter: only the root passes input tensors")
            sig = ("scatter", out.dtype, out.numel(), root)

            def launch() -> CommrtWork:
                flat = _flat_copy(ins, out.dtype, out.device) if ins else None
                req = self.communicator.iscatter(flat, out, root)
                return CommrtWork((req,), [out], None, "scatter")
            return _Prepared(sig, launch)
        return self._run("scatter", prepare)

    def _prepare_reduce_scatter_base(self, output: torch.Tensor, inp: torch.Tensor, opts: Any,
                                     op: str) -> tuple[tuple, Callable[[], CommrtWork]]:
        inp = _check_tensor(inp, op, "input")
        output = _check_tensor(output, op, "output")
        if output.dtype != inp.dtype:
            raise ValueError(f"commrt {op}: input dtype {inp.dtype} and output dtype "
                             f"{output.dtype} differ")
        if inp.numel() != self._size * output.numel():
            raise ValueError(f"commrt {op}: the input has {inp.numel()} elements, expected "
                             f"world size {self._size} x output {output.numel()}")
        red, average = _reduction(opts, inp.dtype, op)
        sig = (op, inp.dtype, output.numel(), red, average)
        size = self._size

        def launch() -> CommrtWork:
            req = self.communicator.ireduce_scatter(_unaliased(inp, output), output, red,
                                                    kind="reduce_scatter")
            finish = (lambda: output.div_(size)) if average and size > 1 else None
            return CommrtWork((req,), [output], finish, op)
        return sig, launch

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                              opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            return _Prepared(*self._prepare_reduce_scatter_base(output, input, opts,
                                                                "reduce_scatter_tensor"))
        return self._run("reduce_scatter_tensor", prepare)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None) -> CommrtWork:
        op = "reduce_scatter_tensor_coalesced"

        def prepare() -> _Prepared:
            if len(outputs) != len(inputs):
                raise ValueError(f"commrt {op}: {len(outputs)} outputs for {len(inputs)} inputs")
            parts = [self._prepare_reduce_scatter_base(o, i, opts, op)
                     for o, i in zip(outputs, inputs)]
            return _Prepared(tuple(p[0] for p in parts),
                             lambda: self._combine([p[1]() for p in parts], list(outputs), op))
        return self._run(op, prepare)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None) -> CommrtWork:
        def prepare() -> _Prepared:
            out = _single(output_tensors, "reduce_scatter")
            if len(input_tensors) != 1 or len(input_tensors[0]) != self._size:
                raise ValueError(f"commrt reduce_scatter: expected a list of {self._size} "
                                 "input tensors")
            ins = [_check_tensor(i, "reduce_scatter", "input") for i in input_tensors[0]]
            _same_dtype(ins, out.dtype, "reduce_scatter")
            for i in ins:
                if i.numel() != out.numel():
                    raise ValueError(f"commrt reduce_scatter: input tensors of {i.numel()} "
                                     f"elements for an output of {out.numel()}")
            red, average = _reduction(opts, out.dtype, "reduce_scatter")
            sig = ("reduce_scatter", out.dtype, out.numel(), red, average)
            size = self._size

            def launch() -> CommrtWork:
                flat = _flat_copy(ins, out.dtype, out.device)
                req = self.communicator.ireduce_scatter(flat, out, red)
                finish = (lambda: out.div_(size)) if average and size > 1 else None
                return CommrtWork((req,), [out], finish, "reduce_scatter")
            return _Prepared(sig, launch)
        return self._run("reduce_scatter", prepare)

    # -- all-to-all -------------------------------------------------------------------

    def _agree_alltoall(self, op: str, dtype_key: tuple, send: list[int], recv: list[int],
                        error: Exception | None) -> None:
        """Collective: every rank learns every rank's send and receive counts, so a split
        that does not match its peer's is reported identically on all ranks."""
        if not self._validate or self._size == 1:
            if error is not None:
                raise error
            if self._size == 1 and send != recv:
                raise ValueError(f"commrt {op}: the send split {send} and receive split "
                                 f"{recv} differ on a single rank")
            return

        P = self._size
        mine = np.zeros(2 * P + 2, dtype=np.int64)
        if error is None:
            mine[0] = 0
            mine[1] = zlib.crc32(repr(dtype_key).encode())
            mine[2:2 + P] = send
            mine[2 + P:] = recv
        else:
            mine[0] = 1
        table = np.empty((P, 2 * P + 2), dtype=np.int64)
        self.communicator.mpi.Allgather(mine, table)
        if error is not None:
            raise error
        if table[:, 0].any():
            raise ValueError(f"commrt {op}: another rank rejected its arguments for this "
                             "collective (see its error)")
        if (table[:, 1] != table[0, 1]).any():
            raise ValueError(f"commrt {op}: the ranks disagree on the dtype or the row shape; "
                             f"this rank has {dtype_key}")
        sends, recvs = table[:, 2:2 + P], table[:, 2 + P:]
        bad = np.argwhere(sends != recvs.T)
        if len(bad):
            i, j = (int(x) for x in bad[0])
            raise ValueError(f"commrt {op}: the splits do not add up: rank {i} sends "
                             f"{int(sends[i, j])} elements to rank {j}, which expects "
                             f"{int(recvs[j, i])} from it")

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> CommrtWork:
        op = "all_to_all_single"
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        send: list[int] = []
        recv: list[int] = []
        key: tuple = ()
        try:
            inp = _check_tensor(input, op, "input")
            out = _check_tensor(output, op, "output")
            if inp.dtype != out.dtype:
                raise ValueError(f"commrt {op}: input dtype {inp.dtype} and output dtype "
                                 f"{out.dtype} differ")
            row_in, row_out = _row_numel(inp), _row_numel(out)
            if inp.dim() and out.dim() and inp.shape[1:] != out.shape[1:]:
                raise ValueError(f"commrt {op}: input rows {tuple(inp.shape[1:])} and output "
                                 f"rows {tuple(out.shape[1:])} differ")
            send = self._splits(input_split_sizes, inp, op, "input")
            recv = self._splits(output_split_sizes, out, op, "output")
            send = [s * row_in for s in send]
            recv = [s * row_out for s in recv]
            key = (op, inp.dtype, row_in)
            error = None
        except (ValueError, TypeError) as exc:
            error = exc
        self._agree_alltoall(op, key, send, recv, error)
        req = self.communicator.ialltoallv(_unaliased(inp, out), out, send, recv,
                                           kind="all_to_all")
        work = CommrtWork((req,), [out], None, op)
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    alltoall_base = all_to_all_single

    def _splits(self, sizes: Sequence[int], t: torch.Tensor, op: str, what: str) -> list[int]:
        rows = t.size(0) if t.dim() else 1
        if sizes is None or len(sizes) == 0:
            if rows % self._size:
                raise ValueError(f"commrt {op}: the {what} has {rows} rows, not divisible by "
                                 f"the world size {self._size}; pass split sizes")
            return [rows // self._size] * self._size
        sizes = [int(s) for s in sizes]
        if len(sizes) != self._size or any(s < 0 for s in sizes):
            raise ValueError(f"commrt {op}: {what} split sizes must be {self._size} "
                             f"non-negative numbers, got {sizes}")
        if sum(sizes) != rows:
            raise ValueError(f"commrt {op}: {what} split sizes {sizes} add up to {sum(sizes)}, "
                             f"but the {what} has {rows} rows")
        return sizes

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> CommrtWork:
        op = "all_to_all"
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        send: list[int] = []
        recv: list[int] = []
        key: tuple = ()
        try:
            if len(output_tensors) != self._size or len(input_tensors) != self._size:
                raise ValueError(f"commrt {op}: expected {self._size} input and output tensors, "
                                 f"got {len(input_tensors)} and {len(output_tensors)}")
            ins = [_check_tensor(t, op, "input") for t in input_tensors]
            outs = [_check_tensor(t, op, "output") for t in output_tensors]
            dtype = ins[0].dtype
            _same_dtype(ins + outs, dtype, op)
            send = [t.numel() for t in ins]
            recv = [t.numel() for t in outs]
            key = (op, dtype)
            error = None
        except (ValueError, TypeError) as exc:
            error = exc
        self._agree_alltoall(op, key, send, recv, error)
        flat_in = _flat_copy(ins, dtype, ins[0].device)
        flat_out = torch.empty(sum(recv), dtype=dtype, device=outs[0].device)
        req = self.communicator.ialltoallv(flat_in, flat_out, send, recv, kind="all_to_all")
        work = CommrtWork((req,), list(output_tensors),
                          lambda: _scatter_back(flat_out, outs), op)
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    # -- point to point ---------------------------------------------------------------

    def _p2p_tensor(self, tensors: list[torch.Tensor], op: str) -> torch.Tensor:
        return _single(tensors, op)

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int = 0) -> CommrtWork:  # noqa: N803
        t = self._p2p_tensor(tensors, "send")
        dst = _group_rank_arg(dstRank, self._size, "send", "destination")
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        work = CommrtWork((self.communicator.isend(t, dst, int(tag)),), [t], None, "send")
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int = 0) -> CommrtWork:  # noqa: N803
        t = self._p2p_tensor(tensors, "recv")
        src = _group_rank_arg(srcRank, self._size, "recv", "source")
        return self._post_recv(t, src, int(tag))

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> CommrtWork:
        t = self._p2p_tensor(tensors, "recv")
        return self._post_recv(t, T.ANY_SOURCE, int(tag))

    def _post_recv(self, t: torch.Tensor, src: int, tag: int) -> CommrtWork:
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        req = self.communicator.irecv(t, src, tag)
        expected = t.numel() * t.element_size()

        def finish() -> None:
            if req.nbytes is not None and req.nbytes != expected:
                raise RuntimeError(f"commrt recv: received {req.nbytes} bytes from rank "
                                   f"{req.source}, but the tensor holds {expected} bytes "
                                   "(the sender's tensor has another size or dtype)")
        work = CommrtWork((req,), [t], finish, "recv")
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    # -- synchronisation --------------------------------------------------------------

    def barrier(self, opts: Any = None) -> CommrtWork:
        if _completer.queue and not _completer.in_callback():
            _completer.settle()
        return CommrtWork((self.communicator.ibarrier(),), [], None, "barrier")

    def monitored_barrier(self, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        """A barrier that raises RuntimeError instead of hanging when a rank does not
        arrive within `timeout` (default: the group's timeout)."""
        seconds = _timeout_seconds(timeout if timeout is not None else self._timeout)
        self.barrier().wait(timedelta(seconds=seconds) if seconds else None)

    # -- coalescing (torch's _coalescing_manager with a device) ------------------------

    def _start_coalescing(self, device: Any = None) -> None:
        if self._coalescing is not None:
            raise RuntimeError("commrt: coalescing already started on this group")
        self._coalescing = []

    def _end_coalescing(self, device: Any = None) -> CommrtWork:
        works, self._coalescing = self._coalescing or [], None
        return self._combine(works, [t for w in works for t in w._result], "coalesced")

    def _combine(self, works: list[CommrtWork], result: list, op: str) -> CommrtWork:
        def finish() -> None:
            for w in works:
                w.wait()
        reqs = [r for w in works for r in w._requests]
        return CommrtWork(reqs, result, finish, op)


# --------------------------------------------------------------------------------------
# Creation, rendezvous, registration


def _create_group_communicator(ranks: Sequence[int]) -> T.Communicator:
    """A communicator of `ranks` (MPI world ranks), created by its members only: torch
    calls a backend's creator on the members of a new group alone. (torch's group names
    cannot serve as the MPI tag: with use_local_synchronization they count groups per
    rank; the transport derives the tag from the member list.)"""
    world = T.world()
    if world.rank not in ranks:
        raise RuntimeError(f"commrt: rank {world.rank} asked to join group {list(ranks)}")
    return world.create_group(ranks)


def _default_group_ranks_match(world: T.Communicator, rank: int, size: int) -> None:
    if world.size == size and world.rank == rank:
        return
    if not launched_by_mpi() and world.size == 1:
        raise RuntimeError(
            "commrt backend: no MPI launcher detected (torchrun or a manual RANK/WORLD_SIZE "
            f"gave world size {size}, MPI sees 1 process); launch with `mpirun -n {size} "
            "python ...` instead")
    raise RuntimeError(
        f"commrt backend: init_process_group was given rank {rank} / world size {size} but "
        f"MPI has rank {world.rank} / size {world.size}; let MPI assign them (launch with "
        "mpirun and pass no rank or world_size)")


def _create_process_group(common_opts: Any, backend_opts: Any = None) -> CommrtProcessGroup:
    """The creator torch calls (extended API): the default group is MPI's world; a group
    made by new_group is an MPI communicator of its members."""
    rank, size = int(common_opts.group_rank), int(common_opts.group_size)
    ranks = list(getattr(common_opts, "global_ranks_in_group", []) or [])
    group_id = str(getattr(common_opts, "group_id", "") or "")
    timeout = getattr(common_opts, "timeout", None)
    if not ranks:
        world = T.world()
        _default_group_ranks_match(world, rank, size)
        comm = world
    else:
        world = T.world()
        if ranks[rank] != world.rank:
            raise RuntimeError(f"commrt backend: global rank {ranks[rank]} of the new group "
                               f"is MPI rank {world.rank}; commrt needs the default group "
                               "numbered like MPI's world")
        comm = _create_group_communicator(ranks)
    return CommrtProcessGroup(comm, timeout=timeout, group_name=group_id)


def _network_identity() -> str:
    """Who shares this process's loopback: the host name plus the network namespace.
    Ranks in different namespaces of one host (containers, the perf suite's emulated
    nodes) share a host name but cannot reach each other at 127.0.0.1."""
    try:
        namespace = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def _ipv4_addresses() -> list[str]:
    """This process's IPv4 addresses other hosts may reach, best guess first: what the
    host name resolves to (unless loopback), then every interface's address (Linux)."""
    found: list[str] = []
    try:
        found.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:
        import fcntl
        import struct

        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(probe.fileno(), siocgifaddr,
                                         struct.pack("256s", name.encode()[:15]))
                except OSError:     # an interface with no IPv4 address
                    continue
                found.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError):
        pass
    return [a for i, a in enumerate(found)
            if not a.startswith("127.") and a not in found[:i]]


def _reachable(addresses: Sequence[str], port: int, deadline: float) -> str | None:
    """The first address at which something accepts a TCP connection on `port`."""
    for address in addresses:
        try:
            with socket.create_connection((address, port),
                                          timeout=max(0.5, min(5.0, deadline - time.time()))):
                return address
        except OSError:
            continue
    return None


def mpi_tcp_store(world: Any = None, timeout: timedelta = timedelta(minutes=30)) -> Any:
    """A ``torch.distributed.TCPStore`` agreed over MPI, with no MASTER_ADDR/PORT needed.

    Rank 0 of `world` (default: MPI's world communicator) serves it on an ephemeral port
    (the server listens on every interface) and broadcasts the port, its network identity
    and its addresses. A rank in rank 0's network namespace connects at 127.0.0.1; any
    other rank connects at the first of rank 0's addresses that accepts a connection.
    Raises RuntimeError, on the ranks that cannot reach rank 0, naming what they tried
    (set MASTER_ADDR and MASTER_PORT to choose the address yourself).
    """
    world = world if world is not None else T.world()
    if world.rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world.size, True, timeout=timeout,
                              wait_for_workers=False)
        world.bcast_object((store.port, _network_identity(), _ipv4_addresses()), 0)
        return store
    port, identity, addresses = world.bcast_object(None, 0)
    if identity == _network_identity():
        address = "127.0.0.1"
    else:
        deadline = time.time() + min(60.0, timeout.total_seconds())
        address = None
        while address is None and time.time() < deadline:
            address = _reachable(addresses, port, deadline)
            if address is None:
                time.sleep(0.2)
        if address is None:
            raise RuntimeError(
                f"commrt: rank {world.rank} cannot reach rank 0's store on port {port} at any "
                f"of its addresses {addresses or '(none found)'}; set MASTER_ADDR and "
                "MASTER_PORT to an address every rank can reach")
    return dist.TCPStore(address, port, world.size, False, timeout=timeout)


def _wrap_env_rendezvous() -> None:
    """Make ``env://`` (init_process_group's default) work under mpirun with no MASTER_*
    variables: where torch would fail for want of them and an MPI launcher is present,
    the store is agreed over MPI instead. Everything else goes to torch's handler."""
    import importlib

    # `torch.distributed.rendezvous` the attribute is a function; the module holds the table.
    rdzv = importlib.import_module("torch.distributed.rendezvous")
    handlers = getattr(rdzv, "_rendezvous_handlers", None)
    original = None if handlers is None else handlers.get("env")
    if original is None or getattr(original, "_commrt_wrapped", False):
        return

    def env_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: Any):
        from urllib.parse import urlparse

        if launched_by_mpi() and "MASTER_ADDR" not in os.environ \
                and "MASTER_PORT" not in os.environ:
            world = T.world()
            store, rank, size = mpi_tcp_store(world, timeout), world.rank, world.size
            query = dict(kv.split("=", 1) for kv in urlparse(url).query.split("&") if "=" in kv)
            for key, mpi_value in (("rank", rank), ("world_size", size)):
                given = int(query.get(key, -1))
                if given not in (-1, mpi_value):
                    raise RuntimeError(
                        f"commrt: init_process_group got {key}={given} but MPI says "
                        f"{mpi_value}; under mpirun let MPI assign rank and world size")
            yield store, rank, size
            raise RuntimeError("Unable to perform re-rendezvous using env:// under mpirun")
        yield from original(url, timeout=timeout, **kwargs)

    env_rendezvous._commrt_wrapped = True  # type: ignore[attr-defined]
    handlers["env"] = env_rendezvous


_registered = False
_register_lock = threading.Lock()


def register() -> None:
    """Register the `commrt` backend with torch.distributed (idempotent, cheap: MPI is
    initialised only when a group is created)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        if BACKEND_NAME.upper() not in dist.Backend._plugins:
            dist.Backend.register_backend(BACKEND_NAME, _create_process_group,
                                          extended_api=True, devices=list(SUPPORTED_DEVICES))
        _wrap_env_rendezvous()
        _registered = True


if dist.is_available():
    register()
