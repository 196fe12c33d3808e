"""The MPI transport's `Communicator`: moves torch tensors between ranks with non-blocking
MPI requests.

Every operation takes torch tensors of any dtype (float16, bfloat16 and bool included), on
the CPU or, where a GPU is present, on CUDA, contiguous or not, and returns a `Request`
(request.py) backed by real MPI requests. Data-movement operations (send, broadcast,
gathers, all-to-all) travel as raw bytes; reductions use the matching MPI datatype (see
buffers.py for dtypes and the staging of tensors MPI cannot use in place).

Every byte sent is counted in `commrt.transports.wire` under a *kind* label (see
counters.py for the accounting rule).
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import library
from .buffers import as_buffer, mpi_reduction, stage, stage_in, stage_out, tensor_nbytes
from .counters import wire
from .library import load_mpi
from .request import CheckSlots, Request

# Wildcards of commrt's own (MPI's values differ between libraries); mapped at the call.
ANY_SOURCE = -1
ANY_TAG = -1


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
        self._check_slots: CheckSlots | None = None

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
        MPI = load_mpi()
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
        MPI = load_mpi()
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
        MPI = load_mpi()
        return Communicator(self.mpi.Split_type(MPI.COMM_TYPE_SHARED, self.rank))

    # -- point to point ---------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0, *,
              kind: str = "send") -> Request:
        """Send `tensor`'s bytes to `dest`. Wire bytes: exactly the tensor's bytes."""
        self._check_rank(dest, "destination")
        work, staged = stage_in(tensor)
        nbytes = tensor_nbytes(work)
        req = self.mpi.Isend([as_buffer(work, nbytes), nbytes, load_mpi().BYTE], dest, tag)
        wire.add(kind, nbytes)
        return Request([req], staged, buffers=work)

    def irecv(self, tensor: torch.Tensor, source: int = ANY_SOURCE, tag: int = ANY_TAG, *,
              kind: str = "recv") -> Request:
        """Receive into `tensor` (a message of at most its size) from `source` (any rank by
        default); after completion `req.source` and `req.nbytes` tell who sent how much."""
        if source != ANY_SOURCE:
            self._check_rank(source, "source")
        work, staged = stage_out(tensor)
        nbytes = tensor_nbytes(work)
        MPI = load_mpi()
        req = self.mpi.Irecv([as_buffer(work, nbytes), nbytes, MPI.BYTE],
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
        mpi_op, datatype, upcast = mpi_reduction(op, tensor.dtype)
        if not upcast and tensor.is_cpu and tensor.is_contiguous():
            work, staged = tensor, ()  # (the common case, spared stage()'s dtype lookups)
        else:
            work, staged = stage_out(tensor, reduce=True)
        if self.size == 1:
            return Request.completed(staged)
        n = work.numel()
        B = n * work.element_size()
        token = self._post_check(check)
        MPI = library.MPI
        req = self.mpi.Iallreduce(MPI.IN_PLACE, [MPI.buffer.fromaddress(work.data_ptr(), B),
                                                 n, datatype], mpi_op)
        wire.add(kind, 2 * (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=work, check=token)

    def ibroadcast(self, tensor: torch.Tensor, root: int, *, kind: str = "broadcast",
                   check: bytes | None = None) -> Request:
        """In place: every rank ends with root's tensor. Wire bytes: (P-1)/P * B."""
        if not 0 <= root < self.size:  # (the checker called only to raise: every call's path)
            self._check_rank(root, "root")
        if tensor.is_cpu and tensor.is_contiguous():
            work, staged = tensor, ()  # (the common case, spared stage()'s checks)
        else:
            work, staged = stage_out(tensor)
        if self.size == 1:
            return Request.completed(staged)
        B = work.numel() * work.element_size()
        token = self._post_check(check)
        MPI = library.MPI
        req = self.mpi.Ibcast([MPI.buffer.fromaddress(work.data_ptr(), B), B, MPI.BYTE], root)
        wire.add(kind, (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=work, check=token)

    def ireduce(self, tensor: torch.Tensor, root: int, op: str = "sum", *,
                kind: str = "reduce", check: bytes | None = None) -> Request:
        """In place on root: root ends with the reduction; other ranks' tensors are unchanged.
        Wire bytes: (P-1)/P * B."""
        self._check_rank(root, "root")
        MPI = load_mpi()
        work, staged = stage(tensor, True, self.rank == root)
        mpi_op, datatype, _ = mpi_reduction(op, tensor.dtype)
        if self.size == 1:
            return Request.completed(staged)
        B = tensor_nbytes(work)
        spec = [as_buffer(work, B), work.numel(), datatype]
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
        if inp.dtype != out.dtype:  # (the checker called only to raise: every call's path)
            self._check_same_dtype(inp, out)
        if out.numel() != self.size * inp.numel():
            raise ValueError(f"all_gather output has {out.numel()} elements, expected "
                             f"{self.size} x {inp.numel()}")
        if inp.is_cpu and out.is_cpu and inp.is_contiguous() and out.is_contiguous():
            win, wout, staged = inp, out, ()  # (the common case, spared stage()'s checks)
        else:
            win, sin = stage_in(inp)
            wout, sout = stage_out(out)
            staged = sin + sout
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(staged)
        # Equal blocks: MPI_Iallgather, without the v-variant's count and offset lists.
        nbytes = win.numel() * win.element_size()
        MPI = library.MPI
        fromaddress, BYTE = MPI.buffer.fromaddress, MPI.BYTE
        token = self._post_check(check)
        req = self.mpi.Iallgather([fromaddress(win.data_ptr(), nbytes), nbytes, BYTE],
                                  [fromaddress(wout.data_ptr(), nbytes * self.size), nbytes,
                                   BYTE])
        wire.add(kind, (self.size - 1) * nbytes)
        return Request([req], staged, buffers=(win, wout), check=token)

    def iallgatherv(self, inp: torch.Tensor, out: torch.Tensor, counts: Sequence[int], *,
                    kind: str = "all_gather", check: bytes | None = None) -> Request:
        """out = concatenation of every rank's inp, rank r contributing counts[r] elements.
        Wire bytes: (P-1)/P * bytes(out)."""
        self._check_same_dtype(inp, out)
        counts = self._check_counts(counts, "all_gather counts")
        if counts[self.rank] != inp.numel() or sum(counts) != out.numel():
            raise ValueError(f"all_gather counts {counts} do not match input {inp.numel()} "
                             f"/ output {out.numel()} elements")
        win, sin = stage_in(inp)
        wout, sout = stage_out(out)
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(sin + sout)
        es = inp.element_size()
        bcounts = [c * es for c in counts]
        displs = np.cumsum([0] + bcounts[:-1]).tolist()
        BYTE = load_mpi().BYTE
        token = self._post_check(check)
        req = self.mpi.Iallgatherv([as_buffer(win), bcounts[self.rank], BYTE],
                                   [as_buffer(wout), bcounts, displs, BYTE])
        wire.add(kind, (self.size - 1) * tensor_nbytes(out) // self.size)
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def ireduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, op: str = "sum", *,
                        kind: str = "reduce_scatter", check: bytes | None = None) -> Request:
        """out = rank r's block of the reduction of inp; inp.numel() == P*out.numel().
        Wire bytes: (P-1)/P * B(inp) (B after any upcast)."""
        if inp.dtype != out.dtype:  # (the checker called only to raise: every call's path)
            self._check_same_dtype(inp, out)
        n = out.numel()
        if inp.numel() != self.size * n:
            raise ValueError(f"reduce_scatter input has {inp.numel()} elements, expected "
                             f"{self.size} x {n}")
        mpi_op, dt, upcast = mpi_reduction(op, inp.dtype)
        if not upcast and inp.is_cpu and out.is_cpu and inp.is_contiguous() and \
                out.is_contiguous():
            win, wout, staged = inp, out, ()  # (the common case, spared stage()'s checks)
        else:
            win, sin = stage_in(inp, reduce=True)
            wout, sout = stage_out(out, reduce=True)
            staged = sin + sout
        if self.size == 1:
            wout.view(-1).copy_(win.view(-1))
            return Request.completed(staged)
        B = win.numel() * win.element_size()
        fromaddress = library.MPI.buffer.fromaddress
        token = self._post_check(check)
        req = self.mpi.Ireduce_scatter_block([fromaddress(win.data_ptr(), B), n, dt],
                                             [fromaddress(wout.data_ptr(), B // self.size), n,
                                              dt], mpi_op)
        wire.add(kind, (self.size - 1) * B // self.size)
        return Request([req], staged, buffers=(win, wout), check=token)

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
        win, sin = stage_in(inp)
        wout, sout = stage_out(out)
        es = inp.element_size()
        sb = [c * es for c in send_counts]
        rb = [c * es for c in recv_counts]
        sd = np.cumsum([0] + sb[:-1]).tolist()
        rd = np.cumsum([0] + rb[:-1]).tolist()
        BYTE = load_mpi().BYTE
        token = self._post_check(check)
        req = self.mpi.Ialltoallv([as_buffer(win), sb, sd, BYTE], [as_buffer(wout), rb, rd, BYTE])
        wire.add(kind, sum(sb) - sb[self.rank])
        return Request([req], sin + sout, buffers=(win, wout), check=token)

    def igather(self, inp: torch.Tensor, out: torch.Tensor | None, root: int, *,
                kind: str = "gather", check: bytes | None = None) -> Request:
        """Root's out = concatenation of every rank's inp (out is ignored elsewhere).
        Wire bytes: bytes(inp) on every rank but root."""
        self._check_rank(root, "root")
        win, staged = stage_in(inp)
        BYTE = load_mpi().BYTE
        B = tensor_nbytes(win)
        recv = None
        if self.rank == root:
            if out is None or out.numel() != self.size * inp.numel():
                raise ValueError(f"gather root needs an output of {self.size} x {inp.numel()} "
                                 "elements")
            self._check_same_dtype(inp, out)
            wout, sout = stage_out(out)
            staged += sout
            recv = [as_buffer(wout), B, BYTE]
        token = self._post_check(check)
        req = self.mpi.Igather([as_buffer(win), B, BYTE], recv, root)
        wire.add(kind, 0 if self.rank == root else B)
        return Request([req], staged, buffers=(inp, out), check=token)

    def iscatter(self, inp: torch.Tensor | None, out: torch.Tensor, root: int, *,
                 kind: str = "scatter", check: bytes | None = None) -> Request:
        """Every rank's out = block r of root's inp (inp is ignored elsewhere).
        Wire bytes: (P-1) * bytes(out) on root, 0 elsewhere."""
        self._check_rank(root, "root")
        wout, staged = stage_out(out)
        BYTE = load_mpi().BYTE
        B = tensor_nbytes(wout)
        send = None
        if self.rank == root:
            if inp is None or inp.numel() != self.size * out.numel():
                raise ValueError(f"scatter root needs an input of {self.size} x {out.numel()} "
                                 "elements")
            self._check_same_dtype(inp, out)
            win, sin = stage_in(inp)
            staged += sin
            send = [as_buffer(win), B, BYTE]
        token = self._post_check(check)
        req = self.mpi.Iscatter(send, [as_buffer(wout), B, BYTE], root)
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
        if len(check) == CheckSlots.NBYTES:
            slots = self._check_slots
            if slots is None:  # (collective: every rank posts its first check in step)
                slots = self._check_slots = CheckSlots(self.mpi)
            return slots.start(check)
        result = bytearray(check)  # one per check: several may be in flight at once
        MPI = library.MPI
        return (self.mpi.Iallreduce(MPI.IN_PLACE, [result, len(check) >> 3, MPI.INT64_T],
                                    MPI.MAX), result, check, None)

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
        MPI = load_mpi()
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
