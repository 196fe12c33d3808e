"""`CommrtProcessGroup`: every c10d operation over the MPI transport, and group creation.

Every operation takes one path, `CommrtProcessGroup._post`: complete pending futures (see
work.py), run the op's local argument checks, number it in its group (`seq`), post the
data with the cross-rank agreement check travelling just ahead of it (the transport's
``check=``, `commrt.transports.agreement`), and wrap the requests in a `CommrtWork`
(joining a coalescing block if one is open). The operations themselves (their checks,
signatures and launches) are in ops.py.

Agreement (the switch is torch's ``TORCH_DISTRIBUTED_DEBUG``, read when a group is made):

- default (``OFF``/``INFO``): the check is posted non-blocking just before the data, on
  the same communicator, by the data's first transport request, which waits for it
  first. A disagreement (or a local argument error on some rank) raises ValueError on
  every rank at ``wait()``. The data collective was posted with mismatched arguments and
  cannot be cancelled (MPI), so the group is then unusable: its later operations raise
  RuntimeError naming the failed one. A local error made identically on every rank
  leaves the group usable.
- ``DETAIL``: the check is waited for before the data is posted; every rank raises
  ValueError and nothing ill-matched reaches MPI, so the group stays usable.

A rank that rejects its own arguments still posts the check (with its flag set), waits
for it, and raises its own error; the other ranks learn of it from the flag.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commrt import transports as T
from commrt.transports.agreement import TableCheck, debug_detail, encode_signature

from .ops import CollectiveOps
from .validation import SUPPORTED_DEVICES, agreement_error
from .watchdog import watchdog
from .work import CommrtWork, completer, timeout_seconds

__all__ = ["BACKEND_NAME", "CommrtProcessGroup", "create_process_group"]

BACKEND_NAME = "commrt"

# Operations between a pair of ranks: no agreement, numbered apart from the collectives.
P2P_OPS = frozenset(("send", "recv"))
# Operations whose agreement all-gathers every rank's splits (they must match pairwise).
TABLE_OPS = frozenset(("all_to_all", "all_to_all_single"))

_REJECTED = encode_signature(None).tobytes()
_encoded: dict[tuple, bytes] = {}  # signature -> its check vector


class CommrtProcessGroup(CollectiveOps, dist.ProcessGroup):
    """A torch.distributed ProcessGroup whose collectives run on a commrt `Communicator`.

    `communicator` is the transport Communicator underneath (what
    `commrt.transports.for_group(pg)` returns); `_get_backend(device)` returns the group
    itself so that lookups through c10d's backend accessor find it too.
    """

    def __init__(self, communicator: T.Communicator, *, timeout: timedelta | None = None,
                 group_name: str = "", group_desc: str = "", store: Any = None,
                 owns_communicator: bool = False) -> None:
        super().__init__(communicator.rank, communicator.size)
        self.communicator = communicator
        # monitored_barrier's acks travel on their own communicator: a late ack left over
        # from an expired barrier can never match a user send/recv or a collective.
        self._monitor = communicator.dup()
        self._monitor_seq = 0
        self._owned = [self._monitor] + ([communicator] if owns_communicator else [])
        self._rank = communicator.rank
        self._size = communicator.size
        self._timeout = timeout
        self._group_name = group_name
        self._group_desc = group_desc
        self._detail = debug_detail()
        # Whether a collective's agreement check is posted with its data (see the module
        # docstring): not under DETAIL, nor on a single rank (nothing to agree with).
        self._check_with_data = not self._detail and self._size > 1
        self._coalescing: list[CommrtWork] | None = None
        self._seq = 0          # collectives posted on this group
        self._p2p_seq = 0      # point-to-point operations posted by this rank
        self._broken: str | None = None
        # Every operation is timed (watchdog.py); progress is published to `store`.
        self.last_posted: CommrtWork | None = None
        watchdog.add_group(self, store, timeout)

    def __repr__(self) -> str:
        return (f"CommrtProcessGroup(rank={self._rank}, size={self._size}, "
                f"name={self._group_name!r})")

    # -- identity ---------------------------------------------------------------------

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def name(self) -> str:
        return BACKEND_NAME

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def _get_backend_name(self) -> str:
        return BACKEND_NAME

    @property
    def group_name(self) -> str:
        return self._group_name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    @property
    def seq(self) -> int:
        """The sequence number of the last collective posted on this group."""
        return self._seq

    def _get_sequence_number_for_group(self) -> int:
        return self._seq

    def _set_group_name(self, name: str) -> None:
        self._group_name = name
        super()._set_group_name(name)

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc
        super()._set_group_desc(desc)

    def _get_backend(self, device: Any = None) -> CommrtProcessGroup:
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
        watchdog.set_timeout(self, timeout)

    def shutdown(self) -> None:
        """Settle completions, stop timing this group and free the communicators it made
        (MPI frees one with operations still pending once they complete); later
        operations raise RuntimeError."""
        completer.settle()
        watchdog.remove_group(self)
        owned, self._owned = self._owned, []
        for comm in owned:
            comm.free()
        if owned and self._broken is None:
            self._broken = f"commrt: group {self._group_name!r} has been shut down"

    def abort(self) -> None:
        T.world().abort(1)

    def mark_broken(self, work: CommrtWork, error: BaseException) -> None:
        """Refuse every later operation: `work` failed while posted (the ranks disagree on
        its arguments: ValueError; or it timed out), and MPI cannot cancel it."""
        if self._broken is None:
            hint = (" Set TORCH_DISTRIBUTED_DEBUG=DETAIL to check arguments before posting "
                    "and keep the group usable" if isinstance(error, ValueError) else "")
            self._broken = (f"commrt: group {self._group_name!r} is unusable: its "
                            f"{work.op} #{work.seq} failed ({error}); MPI cannot cancel a "
                            f"posted operation.{hint}")

    # -- the one path of every operation ----------------------------------------------

    def _post(self, op: str, prepare: Callable[..., tuple], *args: Any) -> CommrtWork:
        """Post operation `op`: ``prepare(*args)`` runs the local checks and returns
        (signature, launch); ``launch(check)`` posts the data, with the agreement vector
        `check` on its first request, and returns (requests, outputs, finish)."""
        if completer.queue and not completer.in_callback():
            completer.settle()
        if self._broken is not None:
            raise RuntimeError(self._broken)
        try:
            signature, launch = prepare(*args)
        except (ValueError, TypeError) as exc:
            raise self._rejected(op, exc) from None
        if op in P2P_OPS:
            self._p2p_seq += 1
            work = CommrtWork(*launch(None), op, self._p2p_seq, signature, self)
        else:
            seq = self._seq = self._seq + 1
            if self._check_with_data and op not in TABLE_OPS:  # (the common case first)
                expected = _encoded.get(signature) or _encoded_signature(signature)
                requests, result, finish = launch(expected)
                if not requests:  # nothing to send (an empty list): the check alone
                    requests = (self.communicator.iagree(expected),)
                # The first request carries the check (see Request.agreed).
                work = CommrtWork(requests, result, finish, op, seq, signature, self,
                                  requests[0])
            elif self._size == 1:
                work = CommrtWork(*launch(None), op, seq, signature, self)
            elif op in TABLE_OPS:
                check = self._settled(TableCheck(self.communicator, _table_code(signature),
                                                 signature[-2], signature[-1], rejected=False),
                                      op, signature)
                work = CommrtWork(*launch(None), op, seq, signature, self, check)
            else:  # DETAIL: agreed before the data is posted
                self._settled(self.communicator.iagree(_encoded_signature(signature)), op,
                              signature)
                work = CommrtWork(*launch(None), op, seq, signature, self)
        self.last_posted = work  # what the watchdog publishes as this rank's progress
        if self._coalescing is not None:
            self._coalescing.append(work)
        return work

    def _settled(self, check: Any, op: str, signature: tuple) -> Any:
        """`check` (posted), or, under DETAIL, None once it has been waited for and agreed
        (raises the disagreement on every rank): see the module docstring."""
        if not self._detail:
            return check
        self._wait_check(check, op, signature)
        if not check.agreed:
            raise agreement_error(op, signature, check)
        return None

    def _rejected(self, op: str, error: BaseException) -> BaseException:
        """This rank rejected the arguments of `op`: return `error` to raise. A collective's
        check is still posted (flag set) and waited for, since the other ranks' checks
        match it (posted before any data); if every rank rejected, nobody posted data and
        the group stays in step, otherwise it is unusable (see the module docstring)."""
        if op in P2P_OPS:
            self._p2p_seq += 1
            return error
        self._seq += 1
        if self._size == 1:
            return error
        comm = self.communicator
        check = TableCheck(comm, 0, (), (), rejected=True) if op in TABLE_OPS else \
            comm.iagree(_REJECTED)
        self._wait_check(check, op, None)
        if not (self._detail or check.all_rejected):
            self._broken = (f"commrt: group {self._group_name!r} is unusable: this rank "
                            f"rejected the arguments of {op} #{self._seq} ({error}) while "
                            "other ranks posted it; MPI cannot cancel a posted collective")
        return error

    def _wait_check(self, check: Any, op: str, signature: tuple | None) -> None:
        """Wait for a check posted ahead of its data, timed like the operation itself: a
        rank whose peers never post it ends in the timeout report, not in a hang."""
        CommrtWork((check,), [], None, op, self._seq, signature, self).wait()

    # -- synchronisation --------------------------------------------------------------

    def _prepare_barrier(self) -> tuple:
        return ("barrier",), lambda check: ((self.communicator.ibarrier(check=check),), [], None)

    def barrier(self, opts: Any = None) -> CommrtWork:
        work = self._post("barrier", self._prepare_barrier)
        timeout = getattr(opts, "timeout", None)
        if timeout is not None and timeout >= timedelta(0):  # dist.barrier(timeout=...)
            work.timeout_s = timeout.total_seconds()
        return work

    def monitored_barrier(self, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        """A barrier that names the ranks that do not arrive, as gloo's does: every other
        rank sends rank 0 an ack and waits (the group's timeout) for its reply; rank 0
        waits for the acks within `timeout` (default: the group's timeout; 0 expires at
        once) and replies only when all arrived, so all ranks pass or none does. Raises
        RuntimeError on rank 0 naming the first missing rank ("Rank N failed to pass
        monitoredBarrier in <ms> ms"), or all of them with `wait_all_ranks`; the group
        stays usable (a pending ack receive is cancelled, and acks are tagged with the
        barrier's number on a communicator of their own). As with gloo, every rank must
        call a group's monitored_barrier equally often (a call only some ranks make
        shifts the numbering). Wire bytes: 1 byte each way between rank 0 and each other
        rank."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        group_s = timeout_seconds(self._timeout) or float("inf")  # 0 there: no timeout
        if timeout is None:
            seconds = group_s
        else:  # an explicit 0 expires at once (torch's meaning)
            seconds = timeout.total_seconds() if isinstance(timeout, timedelta) \
                else float(timeout)
        self._monitor_seq += 1
        tag = self._monitor_seq % 32768  # MPI guarantees tags up to 32767
        comm, rank, size = self._monitor, self._rank, self._size
        if size == 1:
            return
        token = torch.zeros(1, dtype=torch.uint8)
        if rank != 0:
            comm.isend(token, 0, tag, kind="monitored_barrier")
            reply = comm.irecv(torch.zeros(1, dtype=torch.uint8), 0, tag,
                               kind="monitored_barrier")
            if not _wait_until(reply, _deadline(group_s)):
                reply.cancel()
                if reply.source is None:
                    raise RuntimeError(
                        f"Rank {rank} successfully reached monitoredBarrier, but received "
                        "errors while waiting for send/recv from rank 0. Please check rank "
                        "0 logs for faulty rank.")
            return
        ms = int(round(seconds * 1000)) if seconds != float("inf") else -1
        acks = {r: comm.irecv(torch.zeros(1, dtype=torch.uint8), r, tag,
                              kind="monitored_barrier") for r in range(1, size)}
        deadline = _deadline(seconds)

        def withdraw() -> None:
            for req in acks.values():
                req.cancel()
        for r, req in acks.items():
            if not wait_all_ranks and time.monotonic() >= deadline and not req.test():
                passed = [q for q, other in acks.items() if other.done and q < r]
                withdraw()
                raise RuntimeError(f"Rank {rank} timed out in monitoredBarrier after {ms} ms. "
                                   f"Successfully processed ranks: {passed}")
            if not _wait_until(req, deadline):
                req.cancel()
                if req.source is None and not wait_all_ranks:
                    withdraw()
                    raise RuntimeError(f"[Rank 0]: Rank {r} failed to pass monitoredBarrier "
                                       f"in {ms} ms")
        missing = [r for r, req in acks.items() if req.source is None]
        if missing:
            raise RuntimeError(f"[Rank 0]: Ranks {', '.join(map(str, missing))} failed to "
                               f"pass monitoredBarrier in {ms} ms")
        for r in range(1, size):
            comm.isend(token, r, tag, kind="monitored_barrier")

    # -- coalescing (torch's _coalescing_manager with a device) ------------------------

    def _start_coalescing(self, device: Any = None) -> None:
        if self._coalescing is not None:
            raise RuntimeError("commrt: coalescing already started on this group")
        self._coalescing = []

    def _end_coalescing(self, device: Any = None) -> CommrtWork:
        """One Work completing every operation posted since `_start_coalescing` (each was
        posted, with its own agreement check, as it was called)."""
        works, self._coalescing = self._coalescing or [], None
        op = "coalesced(" + ",".join(dict.fromkeys(w.op for w in works)) + ")"
        return CommrtWork(works, [t for w in works for t in w.result_tensors], None, op,
                          self._seq, tuple(w.signature for w in works), self)


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def _wait_until(req: T.Request, deadline: float) -> bool:
    """Whether `req` completes before `deadline` (time.monotonic()); polls every
    millisecond, which only monitored_barrier, off the hot path, uses."""
    while not req.test():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def _encoded_signature(signature: tuple) -> bytes:
    """The agreement vector of `signature` (cached: a training loop repeats a few)."""
    expected = _encoded.get(signature)
    if expected is None:
        expected = encode_signature(signature).tobytes()
        if len(_encoded) < 4096:
            _encoded[signature] = expected
    return expected


def _table_code(signature: tuple) -> int:
    """The all-to-all row's code: dtype and row size (the splits travel in full)."""
    return zlib.crc32(repr(signature[:-2]).encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------
# Creation


def _default_group_ranks_match(world: T.Communicator, rank: int, size: int,
                               bootstrapped: bool) -> None:
    if world.size == size and world.rank == rank:
        return
    if bootstrapped:
        raise RuntimeError(
            f"commrt backend: MPI did not form the {size}-rank world through commrt's PMI "
            f"server (MPI library: {T.library_version()}); starting without mpirun needs "
            "MPICH (pip install 'commrt[mpi]'); with another MPI, launch with its mpirun")
    if not T.launched_by_mpi() and world.size == 1:
        raise RuntimeError(
            f"commrt backend: init_process_group gave world size {size}, but MPI was "
            "already started in this process as a world of its own (mpi4py.MPI was used "
            "before init_process_group, or this is a fork of a process that had used it); "
            "initialise the group first, or start ranks with the 'spawn' method")
    raise RuntimeError(
        f"commrt backend: init_process_group was given rank {rank} / world size {size} but "
        f"MPI has rank {world.rank} / size {world.size}; let MPI assign them (launch with "
        "mpirun and pass no rank or world_size)")


def create_process_group(common_opts: Any, backend_opts: Any = None) -> CommrtProcessGroup:
    """The creator torch calls (extended API): the default group is MPI's world; a group
    made by new_group is an MPI communicator of its members, created by its members only
    (torch calls a backend's creator on the members of a new group alone; torch's group
    names cannot serve as the MPI tag, since with use_local_synchronization they count
    groups per rank: the transport derives the tag from the member list)."""
    rank, size = int(common_opts.group_rank), int(common_opts.group_size)
    ranks = list(getattr(common_opts, "global_ranks_in_group", []) or [])
    group_id = str(getattr(common_opts, "group_id", "") or "")
    timeout = getattr(common_opts, "timeout", None)
    store = getattr(common_opts, "store", None)
    bootstrapped = not ranks and size > 1 and not T.launched_by_mpi() and not T.mpi_started()
    if bootstrapped:
        # torchrun, torch.multiprocessing, or any launcher that gives rank, size and a
        # store: form MPI's world through the store before MPI starts.
        if store is None:
            raise RuntimeError("commrt backend: no MPI launcher and no store to form the "
                               "MPI world through; launch with mpirun or torchrun")
        T.pmi_bootstrap(store, rank, size, timeout)
    world = T.world()
    if not ranks:
        _default_group_ranks_match(world, rank, size, bootstrapped)
        # A duplicate of the world, freed on shutdown: an operation left posted after a
        # timeout can never match a later default group's collectives.
        comm = world.dup()
    else:
        if ranks[rank] != world.rank:
            raise RuntimeError(f"commrt backend: global rank {ranks[rank]} of the new group "
                               f"is MPI rank {world.rank}; commrt needs the default group "
                               "numbered like MPI's world")
        comm = world.create_group(ranks)
    return CommrtProcessGroup(comm, timeout=timeout, group_name=group_id,
                              store=store,
                              owns_communicator=not ranks)
