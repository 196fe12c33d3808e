"""`CommrtProcessGroup`: every c10d operation over the MPI transport, and group creation.

Every operation takes one path, `CommrtProcessGroup._post`: complete pending futures (see
work.py), run the op's local argument checks, number it in its group (`seq`), post the
data with the cross-rank agreement check travelling just ahead of it (the transport's
``check=``, `commrt.transports.agreement`), and wrap the requests in a `CommrtWork`
(joining a coalescing block if one is open).

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
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commrt import transports as T
from commrt.transports.agreement import TableCheck, debug_detail, encode_signature

from .validation import (
    SUPPORTED_DEVICES,
    agreement_error,
    check_tensor,
    group_rank,
    reduction,
    row_numel,
    same_dtype,
    same_pair_dtype,
    single,
    splits,
)
from .watchdog import watchdog
from .work import CommrtWork, completer, timeout_seconds

__all__ = ["BACKEND_NAME", "CommrtProcessGroup", "create_process_group"]

BACKEND_NAME = "commrt"

# Operations between a pair of ranks: no agreement, numbered apart from the collectives.
P2P_OPS = frozenset(("send", "recv"))
# Operations whose agreement all-gathers every rank's splits (they must match pairwise).
TABLE_OPS = frozenset(("all_to_all", "all_to_all_single"))

# A launch, given the operation's agreement vector (None: none), posts the data with that
# check on its first request and returns (requests, output tensors, what to run once the
# requests complete).
Launched = tuple[Sequence[Any], list, "Callable[[], None] | None"]

_REJECTED = encode_signature(None).tobytes()
_encoded: dict[tuple, bytes] = {}  # signature -> its check vector


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
    # Byte ranges, not storages (building a storage object costs more than the rest of a
    # small call): exact where it matters, as a non-contiguous tensor is staged in a copy.
    i, o = inp.data_ptr(), out.data_ptr()
    if i < o + out.numel() * out.element_size() and o < i + inp.numel() * inp.element_size():
        return inp.clone()
    return inp


def _join(launches: Sequence[Callable[..., Launched]], result: list,
          check: bytes | None) -> Launched:
    """Launch several parts as one operation (the *_coalesced variants); the first part
    carries the operation's agreement check."""
    requests: list = []
    finishes: list = []
    for launch in launches:
        reqs, _, finish = launch(check)
        check = None
        requests.extend(reqs)
        if finish is not None:
            finishes.append(finish)

    def finish_all() -> None:
        for fn in finishes:
            fn()
    return requests, result, finish_all if finishes else None


class CommrtProcessGroup(dist.ProcessGroup):
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
        self._coalescing: list[CommrtWork] | None = None
        self._seq = 0          # collectives posted on this group
        self._p2p_seq = 0      # point-to-point operations posted by this rank
        self._broken: str | None = None
        # Every operation is timed (watchdog.py); progress is published to `store`.
        self.last_posted: CommrtWork | None = None
        watchdog.add_group(self, store, timeout)

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
            self._seq += 1
            if self._size == 1:
                work = CommrtWork(*launch(None), op, self._seq, signature, self)
            elif op in TABLE_OPS:
                check = self._settled(TableCheck(self.communicator, _table_code(signature),
                                                 signature[-2], signature[-1], rejected=False),
                                      op, signature)
                work = CommrtWork(*launch(None), op, self._seq, signature, self, check)
            else:
                expected = _encoded.get(signature)
                if expected is None:
                    expected = encode_signature(signature).tobytes()
                    if len(_encoded) < 4096:
                        _encoded[signature] = expected
                if self._detail:
                    self._settled(self.communicator.iagree(expected), op, signature)
                    work = CommrtWork(*launch(None), op, self._seq, signature, self)
                else:
                    requests, result, finish = launch(expected)
                    if not requests:  # nothing to send (an empty list): the check alone
                        requests = (self.communicator.iagree(expected),)
                    # The first request carries the check (see Request.agreed).
                    work = CommrtWork(requests, result, finish, op, self._seq, signature,
                                      self, requests[0])
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

    # -- reductions -------------------------------------------------------------------

    def _launch_allreduce(self, ts: list[torch.Tensor], red: str, average: bool,
                          check: bytes | None) -> Launched:
        size = self._size
        if len(ts) == 1:
            t = ts[0]
            req = self.communicator.iallreduce(t, red, kind="all_reduce", check=check)
            return (req,), ts, (lambda: t.div_(size)) if average and size > 1 else None
        flat = _flat_copy(ts, ts[0].dtype, ts[0].device)
        req = self.communicator.iallreduce(flat, red, kind="all_reduce", check=check)

        def finish() -> None:
            if average and size > 1:
                flat.div_(size)
            _scatter_back(flat, ts)
        return (req,), ts, finish

    def _prepare_allreduce(self, tensors: list[torch.Tensor], opts: Any, op: str) -> tuple:
        if len(tensors) == 1:  # (the common case, without a list's worth of checks)
            t = check_tensor(tensors[0], op)
            dtype = t.dtype
            red, average = reduction(opts, dtype, op)
            return (op, t.numel(), dtype, red, average), \
                lambda check: self._launch_allreduce(tensors, red, average, check)
        if op == "all_reduce":
            raise ValueError(f"commrt {op}: expected exactly one tensor per rank, got "
                             f"{len(tensors)}")
        if not tensors:
            return (op,), lambda check: ((), [], None)
        ts = [check_tensor(t, op) for t in tensors]
        dtype = ts[0].dtype
        same_dtype(ts, dtype, op)
        red, average = reduction(opts, dtype, op)
        return (op, tuple(t.numel() for t in ts), dtype, red, average), \
            lambda check: self._launch_allreduce(ts, red, average, check)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("all_reduce", self._prepare_allreduce, tensors, opts, "all_reduce")

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        """One all_reduce of the tensors concatenated (they share a dtype)."""
        return self._post("all_reduce_coalesced", self._prepare_allreduce, tensors, opts,
                          "all_reduce_coalesced")

    def _prepare_reduce(self, tensors: list[torch.Tensor], opts: Any) -> tuple:
        t = single(tensors, "reduce")
        red, average = reduction(opts, t.dtype, "reduce")
        root = group_rank(getattr(opts, "rootRank", 0), self._size, "reduce", "root")
        size = self._size

        def launch(check: bytes | None) -> Launched:
            req = self.communicator.ireduce(t, root, red, check=check)
            finish = None
            if average and self._rank == root and size > 1:
                finish = lambda: t.div_(size)  # noqa: E731
            return (req,), [t], finish
        return ("reduce", t.numel(), t.dtype, red, average, root), launch

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("reduce", self._prepare_reduce, tensors, opts)

    def _prepare_broadcast(self, tensors: list[torch.Tensor], opts: Any) -> tuple:
        t = single(tensors, "broadcast")
        root = group_rank(getattr(opts, "rootRank", 0), self._size, "broadcast", "root")
        return ("broadcast", t.numel(), t.dtype, root), \
            lambda check: ((self.communicator.ibroadcast(t, root, check=check),), [t], None)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("broadcast", self._prepare_broadcast, tensors, opts)

    # -- gathers and scatters ---------------------------------------------------------

    def _prepare_allgather(self, output_tensors: list[list[torch.Tensor]],
                           input_tensors: list[torch.Tensor]) -> tuple:
        op = "all_gather"
        if len(output_tensors) != 1 or len(input_tensors) != 1:
            raise ValueError(f"commrt {op}: expected one input tensor and one output list per "
                             "rank")
        inp = check_tensor(input_tensors[0], op, "input")
        outputs = [check_tensor(o, op, "output") for o in output_tensors[0]]
        if len(outputs) != self._size:
            raise ValueError(f"commrt {op}: the output list has {len(outputs)} tensors, "
                             f"expected one per rank ({self._size})")
        same_dtype(outputs, inp.dtype, op)
        counts = [o.numel() for o in outputs]
        if counts[self._rank] != inp.numel():
            raise ValueError(f"commrt {op}: the input has {inp.numel()} elements but this "
                             f"rank's output slot has {counts[self._rank]}")

        def launch(check: bytes | None) -> Launched:
            flat = torch.empty(sum(counts), dtype=inp.dtype, device=inp.device)
            req = self.communicator.iallgatherv(inp, flat, counts, kind="all_gather",
                                                check=check)
            return (req,), output_tensors, lambda: _scatter_back(flat, outputs)
        return (op, inp.dtype, tuple(counts)), launch

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("all_gather", self._prepare_allgather, output_tensors, input_tensors)

    def _prepare_allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                                     input_list: list[torch.Tensor]) -> tuple:
        """c10d's contract: output_lists[r][i] receives rank r's input_list[i]. The inputs
        are concatenated and all-gathered in one collective (every rank passes inputs of
        the same sizes)."""
        op = "all_gather_coalesced"
        P = self._size
        ins = [check_tensor(t, op, "input") for t in input_list]
        if len(output_lists) != P:
            raise ValueError(f"commrt {op}: {len(output_lists)} output lists, expected one per "
                             f"rank ({P})")
        if not ins:
            if any(len(lst) for lst in output_lists):
                raise ValueError(f"commrt {op}: output tensors for no inputs")
            return (op,), lambda check: ((), output_lists, None)
        dtype = ins[0].dtype
        same_dtype(ins, dtype, op)
        numels = [t.numel() for t in ins]
        outs: list[torch.Tensor] = []
        for r, lst in enumerate(output_lists):
            if len(lst) != len(ins):
                raise ValueError(f"commrt {op}: the output list for rank {r} has {len(lst)} "
                                 f"tensors, expected one per input ({len(ins)})")
            for i, o in enumerate(lst):
                check_tensor(o, op, "output")
                if o.dtype != dtype or o.numel() != numels[i]:
                    raise ValueError(f"commrt {op}: output [{r}][{i}] is {o.dtype} with "
                                     f"{o.numel()} elements, expected {dtype} with "
                                     f"{numels[i]} (like input {i})")
                outs.append(o)

        def launch(check: bytes | None) -> Launched:
            flat_in = _flat_copy(ins, dtype, ins[0].device)
            flat_out = torch.empty(P * flat_in.numel(), dtype=dtype, device=ins[0].device)
            req = self.communicator.iallgather(flat_in, flat_out, kind="all_gather",
                                               check=check)
            return (req,), output_lists, lambda: _scatter_back(flat_out, outs)
        return (op, dtype, tuple(numels)), launch

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            input_list: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("all_gather_coalesced", self._prepare_allgather_coalesced,
                          output_lists, input_list)

    def _prepare_allgather_base(self, output: torch.Tensor, inp: torch.Tensor,
                                op: str) -> tuple:
        inp = check_tensor(inp, op, "input")
        output = check_tensor(output, op, "output")
        same_pair_dtype(inp, output, op)
        if output.numel() != self._size * inp.numel():
            raise ValueError(f"commrt {op}: the output has {output.numel()} elements, "
                             f"expected world size {self._size} x input {inp.numel()}")
        return (op, inp.dtype, inp.numel()), lambda check: (
            (self.communicator.iallgather(_unaliased(inp, output), output, kind="all_gather",
                                          check=check),),
            [output], None)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          opts: Any = None) -> CommrtWork:
        return self._post("all_gather_into_tensor", self._prepare_allgather_base, output, input,
                          "all_gather_into_tensor")

    _allgather_base = all_gather_single

    def _prepare_coalesced(self, base: Callable[..., tuple], outputs: list[torch.Tensor],
                           inputs: list[torch.Tensor], op: str, *extra: Any) -> tuple:
        """A *_coalesced variant from its base op's prepare: one signature, the parts'
        collectives posted together and completed as one Work."""
        if len(outputs) != len(inputs):
            raise ValueError(f"commrt {op}: {len(outputs)} outputs for {len(inputs)} inputs")
        parts = [base(o, i, *extra, op) for o, i in zip(outputs, inputs)]
        signature = (op, *(p[0][1:] for p in parts))
        return signature, lambda check: _join([p[1] for p in parts], list(outputs), check)

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor],
                                    inputs: list[torch.Tensor], opts: Any = None) -> CommrtWork:
        return self._post("all_gather_into_tensor_coalesced", self._prepare_coalesced,
                          self._prepare_allgather_base, outputs, inputs,
                          "all_gather_into_tensor_coalesced")

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def _root_tensors(self, lists: list[list[torch.Tensor]], like: torch.Tensor, root: int,
                      op: str, what: str) -> list[torch.Tensor]:
        """The root's list of one `what` ("input" or "output") tensor per rank of gather or
        scatter, each of `like`'s dtype and size; [] on the other ranks, which must pass
        none."""
        if self._rank != root:
            if lists and any(lists):
                raise ValueError(f"commrt {op}: only the root passes {what} tensors")
            return []
        if len(lists) != 1 or len(lists[0]) != self._size:
            raise ValueError(f"commrt {op}: the root needs a list of {self._size} {what} "
                             "tensors")
        tensors = [check_tensor(t, op, what) for t in lists[0]]
        same_dtype(tensors, like.dtype, op)
        other = "inputs" if what == "output" else "outputs"
        for t in tensors:
            if t.numel() != like.numel():
                raise ValueError(f"commrt {op}: {what} tensors of {t.numel()} elements for "
                                 f"{other} of {like.numel()}")
        return tensors

    def _prepare_gather(self, output_tensors: list[list[torch.Tensor]],
                        input_tensors: list[torch.Tensor], opts: Any) -> tuple:
        inp = single(input_tensors, "gather")
        root = group_rank(getattr(opts, "rootRank", 0), self._size, "gather", "root")
        outs = self._root_tensors(output_tensors, inp, root, "gather", "output")

        def launch(check: bytes | None) -> Launched:
            flat = None
            if self._rank == root:
                flat = torch.empty(self._size * inp.numel(), dtype=inp.dtype, device=inp.device)
            req = self.communicator.igather(inp, flat, root, check=check)
            return (req,), outs, (lambda: _scatter_back(flat, outs)) if flat is not None else None
        return ("gather", inp.dtype, inp.numel(), root), launch

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: Any = None) -> CommrtWork:
        return self._post("gather", self._prepare_gather, output_tensors, input_tensors, opts)

    def _prepare_scatter(self, output_tensors: list[torch.Tensor],
                         input_tensors: list[list[torch.Tensor]], opts: Any) -> tuple:
        out = single(output_tensors, "scatter")
        root = group_rank(getattr(opts, "rootRank", 0), self._size, "scatter", "root")
        ins = self._root_tensors(input_tensors, out, root, "scatter", "input")

        def launch(check: bytes | None) -> Launched:
            flat = _flat_copy(ins, out.dtype, out.device) if ins else None
            return (self.communicator.iscatter(flat, out, root, check=check),), [out], None
        return ("scatter", out.dtype, out.numel(), root), launch

    def scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                opts: Any = None) -> CommrtWork:
        return self._post("scatter", self._prepare_scatter, output_tensors, input_tensors, opts)

    def _prepare_reduce_scatter_base(self, output: torch.Tensor, inp: torch.Tensor, opts: Any,
                                     op: str) -> tuple:
        inp = check_tensor(inp, op, "input")
        output = check_tensor(output, op, "output")
        same_pair_dtype(inp, output, op)
        if inp.numel() != self._size * output.numel():
            raise ValueError(f"commrt {op}: the input has {inp.numel()} elements, expected "
                             f"world size {self._size} x output {output.numel()}")
        red, average = reduction(opts, inp.dtype, op)
        size = self._size

        def launch(check: bytes | None) -> Launched:
            req = self.communicator.ireduce_scatter(_unaliased(inp, output), output, red,
                                                    kind="reduce_scatter", check=check)
            return (req,), [output], (lambda: output.div_(size)) if average and size > 1 else None
        return (op, inp.dtype, output.numel(), red, average), launch

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                              opts: Any = None) -> CommrtWork:
        return self._post("reduce_scatter_tensor", self._prepare_reduce_scatter_base, output,
                          input, opts, "reduce_scatter_tensor")

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None) -> CommrtWork:
        return self._post("reduce_scatter_tensor_coalesced", self._prepare_coalesced,
                          self._prepare_reduce_scatter_base, outputs, inputs,
                          "reduce_scatter_tensor_coalesced", opts)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _prepare_reduce_scatter(self, output_tensors: list[torch.Tensor],
                                input_tensors: list[list[torch.Tensor]], opts: Any) -> tuple:
        op = "reduce_scatter"
        out = single(output_tensors, op)
        if len(input_tensors) != 1 or len(input_tensors[0]) != self._size:
            raise ValueError(f"commrt {op}: expected a list of {self._size} input tensors")
        ins = [check_tensor(i, op, "input") for i in input_tensors[0]]
        same_dtype(ins, out.dtype, op)
        for i in ins:
            if i.numel() != out.numel():
                raise ValueError(f"commrt {op}: input tensors of {i.numel()} elements for an "
                                 f"output of {out.numel()}")
        red, average = reduction(opts, out.dtype, op)
        size = self._size

        def launch(check: bytes | None) -> Launched:
            flat = _flat_copy(ins, out.dtype, out.device)
            req = self.communicator.ireduce_scatter(flat, out, red, check=check)
            return (req,), [out], (lambda: out.div_(size)) if average and size > 1 else None
        return (op, out.dtype, out.numel(), red, average), launch

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None) -> CommrtWork:
        return self._post("reduce_scatter", self._prepare_reduce_scatter, output_tensors,
                          input_tensors, opts)

    # -- all-to-all (signature: (op, dtype, row elements, send counts, receive counts)) ----

    def _prepare_all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                                   output_split_sizes: list[int],
                                   input_split_sizes: list[int]) -> tuple:
        op = "all_to_all_single"
        inp = check_tensor(input, op, "input")
        out = check_tensor(output, op, "output")
        same_pair_dtype(inp, out, op)
        row_in, row_out = row_numel(inp), row_numel(out)
        if inp.dim() and out.dim() and inp.shape[1:] != out.shape[1:]:
            raise ValueError(f"commrt {op}: input rows {tuple(inp.shape[1:])} and output "
                             f"rows {tuple(out.shape[1:])} differ")
        send = [s * row_in for s in splits(input_split_sizes, inp, self._size, op, "input")]
        recv = [s * row_out for s in splits(output_split_sizes, out, self._size, op, "output")]
        self._check_single_rank_splits(op, send, recv)
        return (op, inp.dtype, row_in, tuple(send), tuple(recv)), lambda check: (
            (self.communicator.ialltoallv(_unaliased(inp, out), out, send, recv,
                                          kind="all_to_all"),), [out], None)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> CommrtWork:
        return self._post("all_to_all_single", self._prepare_all_to_all_single, output, input,
                          output_split_sizes, input_split_sizes)

    alltoall_base = all_to_all_single

    def _check_single_rank_splits(self, op: str, send: list[int], recv: list[int]) -> None:
        if self._size == 1 and send != recv:
            raise ValueError(f"commrt {op}: the send split {send} and receive split {recv} "
                             "differ on a single rank")

    def _prepare_alltoall(self, output_tensors: list[torch.Tensor],
                          input_tensors: list[torch.Tensor]) -> tuple:
        op = "all_to_all"
        if len(output_tensors) != self._size or len(input_tensors) != self._size:
            raise ValueError(f"commrt {op}: expected {self._size} input and output tensors, "
                             f"got {len(input_tensors)} and {len(output_tensors)}")
        ins = [check_tensor(t, op, "input") for t in input_tensors]
        outs = [check_tensor(t, op, "output") for t in output_tensors]
        dtype = ins[0].dtype
        same_dtype(ins + outs, dtype, op)
        send = [t.numel() for t in ins]
        recv = [t.numel() for t in outs]
        self._check_single_rank_splits(op, send, recv)

        def launch(check: None) -> Launched:  # (checked by a TableCheck)
            flat_in = _flat_copy(ins, dtype, ins[0].device)
            flat_out = torch.empty(sum(recv), dtype=dtype, device=outs[0].device)
            req = self.communicator.ialltoallv(flat_in, flat_out, send, recv, kind="all_to_all")
            return (req,), list(output_tensors), lambda: _scatter_back(flat_out, outs)
        return (op, dtype, 1, tuple(send), tuple(recv)), launch

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> CommrtWork:
        return self._post("all_to_all", self._prepare_alltoall, output_tensors, input_tensors)

    # -- point to point ---------------------------------------------------------------

    def _prepare_send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> tuple:
        t = single(tensors, "send")
        dst = group_rank(dst, self._size, "send", "destination")
        return ("send", t.numel(), t.dtype, dst, tag), \
            lambda check: ((self.communicator.isend(t, dst, tag),), [t], None)

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int = 0) -> CommrtWork:  # noqa: N803
        return self._post("send", self._prepare_send, tensors, dstRank, int(tag))

    def _prepare_recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> tuple:
        t = single(tensors, "recv")
        if src != T.ANY_SOURCE:
            src = group_rank(src, self._size, "recv", "source")
        expected = t.numel() * t.element_size()

        def launch(check: None) -> Launched:  # (point to point: no agreement)
            req = self.communicator.irecv(t, src, tag)

            def finish() -> None:
                if req.nbytes is not None and req.nbytes != expected:
                    raise RuntimeError(f"commrt recv: received {req.nbytes} bytes from rank "
                                       f"{req.source}, but the tensor holds {expected} bytes "
                                       "(the sender's tensor has another size or dtype)")
            return (req,), [t], finish
        return ("recv", t.numel(), t.dtype, src, tag), launch

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int = 0) -> CommrtWork:  # noqa: N803
        return self._post("recv", self._prepare_recv, tensors, int(srcRank), int(tag))

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> CommrtWork:
        return self._post("recv", self._prepare_recv, tensors, T.ANY_SOURCE, int(tag))

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
