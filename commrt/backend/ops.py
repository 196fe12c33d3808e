"""The c10d operations of `CommrtProcessGroup`: what each one checks, its signature, and
how it posts its data on the transport.

`CollectiveOps` is a mixin of `CommrtProcessGroup` (process_group.py). Every public
method here is a c10d operation; it hands `_post` (the group's one posting path) the op's
name and a prepare function. ``prepare(*args)`` runs the local argument checks and returns
(signature, launch); ``launch(check)`` posts the data, with the agreement vector `check`
on its first request, and returns a `Launched`: (requests, output tensors, what to run
once the requests complete). Several tensors travel as one flat buffer
(`commrt.transports.flat`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from commrt import transports as T
from commrt.transports.flat import flatten, unflatten_into

from .validation import (
    check_tensor,
    group_rank,
    reduction,
    row_numel,
    same_dtype,
    same_pair_dtype,
    single,
    splits,
)
from .work import CommrtWork

__all__ = ["CollectiveOps", "Launched"]

# A launch, given the operation's agreement vector (None: none), posts the data with that
# check on its first request and returns (requests, output tensors, what to run once the
# requests complete).
Launched = tuple[Sequence[Any], list, "Callable[[], None] | None"]


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


class CollectiveOps:
    """Every c10d operation of `CommrtProcessGroup` (which provides `_post`,
    `communicator`, `_rank` and `_size`)."""

    # -- reductions -------------------------------------------------------------------

    def _launch_allreduce(self, ts: list[torch.Tensor], red: str, average: bool,
                          check: bytes | None) -> Launched:
        """All-reduce several tensors as one flat buffer."""
        size = self._size
        flat = flatten(ts)
        req = self.communicator.iallreduce(flat, red, kind="all_reduce", check=check)

        def finish() -> None:
            if average and size > 1:
                flat.div_(size)
            unflatten_into(flat, ts)
        return (req,), ts, finish

    def _prepare_allreduce(self, tensors: list[torch.Tensor], opts: Any, op: str) -> tuple:
        if len(tensors) == 1:  # (the common case, without a list's worth of checks)
            t = check_tensor(tensors[0], op)
            dtype = t.dtype
            red, average = reduction(opts, dtype, op)
            iallreduce, size = self.communicator.iallreduce, self._size
            finish = (lambda: t.div_(size)) if average and size > 1 else None

            def launch(check: bytes | None) -> Launched:
                return (iallreduce(t, red, kind="all_reduce", check=check),), tensors, finish
            return (op, t.numel(), dtype, red, average), launch
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
            return (req,), output_tensors, lambda: unflatten_into(flat, outputs)
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
            flat_in = flatten(ins)
            flat_out = torch.empty(P * flat_in.numel(), dtype=dtype, device=ins[0].device)
            req = self.communicator.iallgather(flat_in, flat_out, kind="all_gather",
                                               check=check)
            return (req,), output_lists, lambda: unflatten_into(flat_out, outs)
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

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
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
            return (req,), outs, (lambda: unflatten_into(flat, outs)) if flat is not None else None
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
            flat = flatten(ins) if ins else None
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

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
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
            flat = flatten(ins)
            req = self.communicator.ireduce_scatter(flat, out, red, check=check)
            return (req,), [out], (lambda: out.div_(size)) if average and size > 1 else None
        return (op, out.dtype, out.numel(), red, average), launch

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None) -> CommrtWork:
        return self._post("reduce_scatter", self._prepare_reduce_scatter, output_tensors,
                          input_tensors, opts)

    # -- all-to-all (signature: (op, dtype, row elements, send counts, receive counts)) ----

    def _prepare_all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
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

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
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
            flat_in = flatten(ins)
            flat_out = torch.empty(sum(recv), dtype=dtype, device=outs[0].device)
            req = self.communicator.ialltoallv(flat_in, flat_out, send, recv, kind="all_to_all")
            return (req,), list(output_tensors), lambda: unflatten_into(flat_out, outs)
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

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int = 0) -> CommrtWork:
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

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int = 0) -> CommrtWork:
        return self._post("recv", self._prepare_recv, tensors, int(srcRank), int(tag))

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> CommrtWork:
        return self._post("recv", self._prepare_recv, tensors, T.ANY_SOURCE, int(tag))
