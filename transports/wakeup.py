"""Waking a thread out of a blocking MPI wait, and how waits spin: `Wakeup`, and
`oversubscribed` (more ranks on this node than cores), which decides it.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from . import library

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
        cores = usable_cores()
    return not local.isdigit() or int(local) > cores


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count where the
    platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        MPI = library.load_mpi()
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
            index = library.MPI.Request.Waitany(requests, status)
        else:
            testany = library.MPI.Request.Testany
            while True:
                index, done = testany(requests, status)
                if done:
                    break
                os.sched_yield()
        if index == 0:
            return True
        self._recv = Wakeup._comm.Irecv([self._buf, 1, library.MPI.BYTE], 0, self._tag)
        return False

    def fire(self) -> None:
        """End the owner thread's current (or next) `wait` (any thread; returns at once:
        a 1-byte send to self is eager)."""
        Wakeup._comm.Send([b"\x01", 1, library.load_mpi().BYTE], 0, self._tag)

