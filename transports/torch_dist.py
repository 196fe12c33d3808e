"""The same Communicator interface over any torch.distributed process group (gloo, nccl).

commrt's collectives and hooks are written against `Communicator`. When a user runs DDP
on gloo or NCCL and registers a commrt hook, the hook gets this adapter: the same methods,
backed by torch.distributed calls on that group, counted in the same `wire` counter with
the same accounting rule.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .counters import wire
from .mpi import ANY_SOURCE, ANY_TAG

_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT, "band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR,
    "bxor": dist.ReduceOp.BXOR,
}


def _torch_op(op: str):
    try:
        return _TORCH_OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r}; expected one of {', '.join(_TORCH_OPS)}") \
            from None


class TorchWorkRequest:
    """A `Request` over torch.distributed Work objects (same wait/test/done interface)."""

    def __init__(self, works: Sequence[Any], finish=None, source: int | None = None):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._done = False
        self._callbacks: list = []
        self.source = source
        self.nbytes: int | None = None

    @property
    def done(self) -> bool:
        return self._done

    def add_done_callback(self, fn) -> None:
        if self._done:
            fn()
        else:
            self._callbacks.append(fn)

    def wait(self) -> TorchWorkRequest:
        if not self._done:
            for w in self._works:
                w.wait()
            self._complete()
        return self

    def test(self) -> bool:
        if not self._done and all(w.is_completed() for w in self._works):
            self.wait()
        return self._done

    def _complete(self) -> None:
        self._done = True
        if self._finish is not None:
            self._finish()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


class TorchDistCommunicator:
    """Communicator interface over a torch.distributed ProcessGroup."""

    mpi = None  # no MPI communicator underneath

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.size: int = dist.get_world_size(group)
        self._global_ranks = dist.get_process_group_ranks(group)

    def __repr__(self) -> str:
        return f"TorchDistCommunicator(rank={self.rank}, size={self.size}, " \
               f"backend={dist.get_backend(self.group)})"

    def _global(self, r: int) -> int:
        if not 0 <= r < self.size:
            raise ValueError(f"rank {r} is out of range for a group of {self.size} ranks")
        return self._global_ranks[r]

    # -- groups -----------------------------------------------------------------------

    def subgroup(self, ranks: Sequence[int]) -> TorchDistCommunicator | None:
        """Collective over the *default* group (torch's new_group rule)."""
        pg = dist.new_group([self._global(r) for r in ranks])
        return TorchDistCommunicator(pg) if self.rank in ranks else None

    def split(self, color: int | None, key: int = 0) -> TorchDistCommunicator | None:
        pairs = self.allgather_object((color, key, self.rank))
        mine = None
        for c in sorted({c for c, _, _ in pairs if c is not None}):
            members = [r for _, _, r in sorted(p for p in pairs if p[0] == c)]
            sub = self.subgroup(members)
            if c == color:
                mine = sub
        return mine

    # -- point to point ---------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0, *, kind: str = "send"):
        t = tensor.contiguous()
        work = dist.isend(t, self._global(dest), group=self.group, tag=tag)
        wire.add(kind, t.numel() * t.element_size())
        return TorchWorkRequest([work])

    def irecv(self, tensor: torch.Tensor, source: int = ANY_SOURCE, tag: int = ANY_TAG, *,
              kind: str = "recv"):
        t = tensor if tensor.is_contiguous() else torch.empty_like(tensor,
                                                                  memory_format=torch.contiguous_format)
        src = None if source == ANY_SOURCE else self._global(source)
        work = dist.irecv(t, src, group=self.group, tag=0 if tag == ANY_TAG else tag)
        req = TorchWorkRequest([work], source=source if source != ANY_SOURCE else None)

        def finish():
            if t is not tensor:
                tensor.copy_(t)
            if req.source is None:
                req.source = self._global_ranks.index(work._source_rank())
            req.nbytes = t.numel() * t.element_size()
            wire.add_received(kind, req.nbytes)
        req._finish = finish
        return req

    # -- collectives ------------------------------------------------------------------

    def iallreduce(self, tensor: torch.Tensor, op: str = "sum", *, kind: str = "all_reduce"):
        t = tensor.contiguous()
        work = dist.all_reduce(t, op=_torch_op(op), group=self.group, async_op=True)
        wire.add(kind, 2 * (self.size - 1) * t.numel() * t.element_size() // self.size)
        return TorchWorkRequest([work], None if t is tensor else (lambda: tensor.copy_(t)))

    def ibroadcast(self, tensor: torch.Tensor, root: int, *, kind: str = "broadcast"):
        t = tensor.contiguous()
        work = dist.broadcast(t, self._global(root), group=self.group, async_op=True)
        wire.add(kind, (self.size - 1) * t.numel() * t.element_size() // self.size)
        return TorchWorkRequest([work], None if t is tensor else (lambda: tensor.copy_(t)))

    def ireduce(self, tensor: torch.Tensor, root: int, op: str = "sum", *, kind: str = "reduce"):
        t = tensor.contiguous()
        work = dist.reduce(t, self._global(root), op=_torch_op(op), group=self.group,
                           async_op=True)
        wire.add(kind, (self.size - 1) * t.numel() * t.element_size() // self.size)
        return TorchWorkRequest([work], None if t is tensor else (lambda: tensor.copy_(t)))

    def iallgather(self, inp: torch.Tensor, out: torch.Tensor, *, kind: str = "all_gather"):
        return self.iallgatherv(inp, out, [inp.numel()] * self.size, kind=kind)

    def iallgatherv(self, inp: torch.Tensor, out: torch.Tensor, counts: Sequence[int], *,
                    kind: str = "all_gather"):
        """Uneven sizes travel padded to the largest count (gloo has no all_gatherv)."""
        counts = [int(c) for c in counts]
        if len(counts) != self.size or sum(counts) != out.numel() or \
                counts[self.rank] != inp.numel():
            raise ValueError(f"all_gather counts {counts} do not match input {inp.numel()} "
                             f"/ output {out.numel()} elements")
        width = max(counts) if counts else 0
        padded = torch.zeros(width, dtype=inp.dtype, device=inp.device)
        padded[: inp.numel()] = inp.reshape(-1)
        gathered = torch.empty(width * self.size, dtype=inp.dtype, device=inp.device)
        work = dist.all_gather_into_tensor(gathered, padded, group=self.group, async_op=True)
        wire.add(kind, (self.size - 1) * gathered.numel() * gathered.element_size() // self.size)

        def finish():
            flat = out.view(-1) if out.is_contiguous() else None
            pieces = [gathered[r * width: r * width + c] for r, c in enumerate(counts)]
            joined = torch.cat(pieces) if pieces else gathered[:0]
            if flat is not None:
                flat.copy_(joined)
            else:
                out.copy_(joined.view(out.shape))
        return TorchWorkRequest([work], finish)

    def ireduce_scatter(self, inp: torch.Tensor, out: torch.Tensor, op: str = "sum", *,
                        kind: str = "reduce_scatter"):
        if inp.numel() != self.size * out.numel():
            raise ValueError(f"reduce_scatter input has {inp.numel()} elements, expected "
                             f"{self.size} x {out.numel()}")
        t = inp.contiguous().view(-1)
        o = out.contiguous().view(-1) if out.is_contiguous() else torch.empty(
            out.numel(), dtype=out.dtype, device=out.device)
        work = dist.reduce_scatter_tensor(o, t, op=_torch_op(op), group=self.group,
                                          async_op=True)
        wire.add(kind, (self.size - 1) * t.numel() * t.element_size() // self.size)
        return TorchWorkRequest([work], None if o.data_ptr() == out.data_ptr() else
                                (lambda: out.copy_(o.view(out.shape))))

    def ialltoall(self, inp: torch.Tensor, out: torch.Tensor, *, kind: str = "all_to_all"):
        counts = [inp.numel() // self.size] * self.size
        return self.ialltoallv(inp, out, counts, counts, kind=kind)

    def ialltoallv(self, inp: torch.Tensor, out: torch.Tensor, send_counts: Sequence[int],
                   recv_counts: Sequence[int], *, kind: str = "all_to_all"):
        if sum(send_counts) != inp.numel() or sum(recv_counts) != out.numel():
            raise ValueError(f"all_to_all counts {list(send_counts)}/{list(recv_counts)} do "
                             f"not add up to the input/output sizes {inp.numel()}/{out.numel()}")
        t = inp.contiguous().view(-1)
        o = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        work = dist.all_to_all_single(o, t, [int(c) for c in recv_counts],
                                      [int(c) for c in send_counts], group=self.group,
                                      async_op=True)
        es = t.element_size()
        wire.add(kind, (sum(send_counts) - send_counts[self.rank]) * es)
        return TorchWorkRequest([work], lambda: out.copy_(o.view(out.shape)))

    def igather(self, inp: torch.Tensor, out: torch.Tensor | None, root: int, *,
                kind: str = "gather"):
        t = inp.contiguous()
        chunks = list(torch.empty(self.size * t.numel(), dtype=t.dtype, device=t.device)
                      .view(self.size, -1).unbind(0)) if self.rank == root else None
        work = dist.gather(t.view(-1), chunks, dst=self._global(root), group=self.group,
                           async_op=True)
        wire.add(kind, 0 if self.rank == root else t.numel() * t.element_size())
        finish = None
        if self.rank == root:
            def finish():
                out.view(-1).copy_(torch.cat(chunks))
        return TorchWorkRequest([work], finish)

    def iscatter(self, inp: torch.Tensor | None, out: torch.Tensor, root: int, *,
                 kind: str = "scatter"):
        o = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        chunks = list(inp.contiguous().view(self.size, -1).unbind(0)) \
            if self.rank == root else None
        work = dist.scatter(o, chunks, src=self._global(root), group=self.group, async_op=True)
        B = o.numel() * o.element_size()
        wire.add(kind, (self.size - 1) * B if self.rank == root else 0)
        return TorchWorkRequest([work], lambda: out.copy_(o.view(out.shape)))

    def ibarrier(self):
        return TorchWorkRequest([dist.barrier(group=self.group, async_op=True)])

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(root), group=self.group)
        return box[0]

    def allgather_object(self, obj: Any) -> list:
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_uniform(self, values: Sequence[int], what: str) -> None:
        v = torch.tensor(list(values), dtype=torch.int64)
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[: len(values)], -both[len(values):]
        if not torch.equal(high, low):
            raise ValueError(f"{what} differs across ranks: per-position min {low.tolist()}, "
                             f"max {high.tolist()} (this rank: {list(values)})")
