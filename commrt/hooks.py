"""DDP communication hooks: sparse (SparDL, TopkA, gTopk) and quantized gradient allreduce.

Usage, on any backend (`commrt`, `gloo`, `nccl`)::

    from commrt.hooks import SparseAllreduceState, sparse_allreduce_hook
    ddp = DistributedDataParallel(model, process_group=pg)
    ddp.register_comm_hook(SparseAllreduceState(0.01, "spardl", teams=1, process_group=pg),
                           sparse_allreduce_hook)
    # or: ddp.register_comm_hook(QuantizedAllreduceState(8), quantized_allreduce_hook)

Each hook reduces a bucket's flat gradient buffer in place to the mean over ranks of the
compressed gradient and returns a completed `torch.futures.Future` holding it (the
collectives run when the hook is called, in bucket order). The error-feedback residuals
live in the state, one per bucket (`bucket.index()`). When DDP rebuilds its buckets
(after the first iteration) every parameter's residual is carried over to its new place,
so no feedback is lost; only if a bucket's buffer does not match its parameters' sizes
is its residual restarted at zero.

The process group's transport comes from `commrt.transports.for_group`: the MPI
communicator underneath a `commrt` group, an adapter over torch.distributed otherwise;
wire bytes are counted in `commrt.transports.wire` either way.

Checkpointing: `state.state_dict(parameters)` / `state.load_state_dict(saved, parameters)`
save the residuals per parameter, by position in `parameters` (ids do not survive a
restart), with the algorithm's adaptive state; after a load each bucket's residual is
rebuilt from them at its first call, whatever the bucket layout then.
"""
# No `from __future__ import annotations` here: DDP's register_comm_hook inspects the
# hooks' annotations and accepts only the real dist.GradBucket / Future[Tensor] objects.
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from commrt.collectives import QuantizedAllreduce, SparseAllreduce


class _BucketResiduals:
    """Residual buffers per DDP bucket, carried over per parameter when buckets change."""

    def __init__(self) -> None:
        self.by_bucket: dict[int, tuple[torch.Tensor, tuple]] = {}
        self._by_param: dict[int, torch.Tensor] = {}   # id(param) -> view of its residual

    def for_bucket(self, bucket: dist.GradBucket) -> tuple[torch.Tensor, bool]:
        """(this bucket's residual, whether it was just created)."""
        buf = bucket.buffer()
        index = bucket.index()
        params = bucket.parameters()
        layout = tuple((id(p), p.numel()) for p in params)
        entry = self.by_bucket.get(index)
        if entry is not None and entry[1] == layout and entry[0].shape == buf.shape \
                and entry[0].dtype == buf.dtype and entry[0].device == buf.device:
            return entry[0], False
        residual = torch.zeros_like(buf)
        if sum(numel for _, numel in layout) == buf.numel():
            offset = 0
            for pid, numel in layout:
                view = residual[offset: offset + numel]
                old = self._by_param.get(pid)
                if old is not None and old.numel() == numel:
                    view.copy_(old.to(dtype=view.dtype, device=view.device))
                self._by_param[pid] = view
                offset += numel
        self.by_bucket[index] = (residual, layout)
        return residual, True

    def state_dict(self, parameters: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: self._by_param[id(p)].detach().clone() for i, p in enumerate(parameters)
                if id(p) in self._by_param}

    def load_state_dict(self, saved: dict[int, torch.Tensor],
                        parameters: Sequence[torch.Tensor]) -> None:
        params = list(parameters)
        self.by_bucket.clear()
        self._by_param = {id(params[i]): r.clone() for i, r in saved.items()}

    def total(self) -> torch.Tensor | None:
        """All residuals concatenated in bucket order (for inspection and tests)."""
        if not self.by_bucket:
            return None
        return torch.cat([self.by_bucket[i][0].reshape(-1) for i in sorted(self.by_bucket)])


def _completed(buf: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


class SparseAllreduceState:
    """State of `sparse_allreduce_hook`: the algorithm's call site and per-bucket residuals.

    density in (0, 1]; algorithm "spardl" | "topka" | "gtopk" | "dense"; teams (SparDL)
    dividing the group size; sag "bruck" | "recursive"; process_group None (default
    group) | torch ProcessGroup | commrt Communicator. reuse_steps / reuse_eps: threshold
    reuse (`commrt.collectives.SparseAllreduce`: a bucket's selection thresholds serve up
    to reuse_steps calls while the candidate counts stay in [k, (1+reuse_eps)·k]; 1 =
    off; the reduced gradients are the same either way). SparDL's adaptive h and the
    thresholds are kept per bucket. The residuals are `residuals.by_bucket[index][0]`.

    `state_dict(parameters)` = {"residuals": {param position: residual},
    "reducer": {"adaptive_h": {bucket: h}, "thresholds": {(bucket, site): {"values",
    "age"}}}}: everything a resumed run needs to continue exactly.
    """

    def __init__(self, density: float, algorithm: str = "spardl", teams: int = 1,
                 process_group: Any = None, *, sag: str = "bruck", reuse_steps: int = 1,
                 reuse_eps: float = 1.0) -> None:
        self.process_group = process_group
        self.reducer = SparseAllreduce(density, algorithm, teams=teams, sag=sag,
                                       group=process_group, reuse_steps=reuse_steps,
                                       reuse_eps=reuse_eps)
        self.residuals = _BucketResiduals()

    def state_dict(self, parameters: Sequence[torch.Tensor]) -> dict[str, Any]:
        return {"residuals": self.residuals.state_dict(parameters),
                "reducer": self.reducer.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], parameters: Sequence[torch.Tensor]) -> None:
        self.residuals.load_state_dict(saved["residuals"], parameters)
        self.reducer.load_state_dict(saved["reducer"])


def sparse_allreduce_hook(state: SparseAllreduceState, bucket: dist.GradBucket
                          ) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's mean gradient, sparsified with error feedback.

    Wire bytes and the conservation invariant per bucket are those of
    `commrt.collectives.sparse_allreduce`. The cross-rank input check runs when a bucket's
    residual is created (first iteration, bucket rebuild), not every step.
    """
    buf = bucket.buffer()
    residual, fresh = state.residuals.for_bucket(bucket)
    state.reducer(buf, residual, key=bucket.index(), validate=fresh)
    return _completed(buf)


class QuantizedAllreduceState:
    """State of `quantized_allreduce_hook`: bits (8, 4 or 1), quantization block size,
    process group, and per-bucket residuals (which also carry the phase-2 error)."""

    def __init__(self, bits: int = 8, process_group: Any = None, *,
                 block_size: int = 256) -> None:
        self.process_group = process_group
        self.reducer = QuantizedAllreduce(bits, block_size=block_size, group=process_group)
        self.residuals = _BucketResiduals()

    def state_dict(self, parameters: Sequence[torch.Tensor]) -> dict[str, Any]:
        return {"residuals": self.residuals.state_dict(parameters)}

    def load_state_dict(self, saved: dict[str, Any], parameters: Sequence[torch.Tensor]) -> None:
        self.residuals.load_state_dict(saved["residuals"], parameters)


def quantized_allreduce_hook(state: QuantizedAllreduceState, bucket: dist.GradBucket
                             ) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's mean gradient through the two-phase quantized allreduce
    (`commrt.collectives.quantized_allreduce`) with error feedback."""
    buf = bucket.buffer()
    residual, fresh = state.residuals.for_bucket(bucket)
    state.reducer(buf, residual, validate=fresh)
    return _completed(buf)
