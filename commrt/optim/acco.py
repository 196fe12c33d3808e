"""ACCO (accumulate while communicating) and its two baselines, ZeRO-1 and DPU, on one code.

All three keep the optimizer state sharded ZeRO-1 style (`commrt.optim.zero1`: rank r
holds a float32 master slice of the flat parameter vector and the AdamW moments for it,
updated by `MaskedAdamW`) and run
the same *communication round*:

    all-reduce the micro-batch count C; reduce-scatter (sum) the flat gradient buffer;
    divide this rank's block by C; AdamW on the shard; all-gather the parameters.

They differ in what runs while the round is on the wire:

- `ZeRO1`: nothing. Compute `micro_batches` micro-batches at θ_t, then the round
  (θ_{t+1} = AdamW(θ_t, ḡ(θ_t))). Plain synchronous sharded data parallelism.
- `DPU` (delayed parameter update): the round for the gradients of step t−1 runs on the
  communication thread while compute produces the gradients of step t at θ_t:
  θ_{t+1} = AdamW(θ_t, ḡ(θ_{t−1})); the first step only computes (θ_1 = θ_0).
- `ACCO`: two rounds per optimizer step (docs/design.md §5). Round A, the *estimate*:
  a dry-run AdamW step (state copied, stepped, restored; the schedule does not advance)
  from h_t, the gradients at θ̃_t, gives θ̃_{t+1} = AdamW_dry(θ_t, h_t), while compute
  accumulates g_t at θ_t. Round B, the *real* step: θ_{t+1} = AdamW(θ_t, mean of h_t and
  g_t over all their micro-batches), while compute accumulates h_{t+1} at θ̃_{t+1}. The
  first call first accumulates h_0 at θ̃_0 = θ_0 with no round in flight.

AdamW is torch.optim.AdamW's formula (decoupled weight decay, bias correction), with the
weight decay applied to tensors of 2+ dimensions only (matrices, embeddings), as
`commrt.optim.data_parallel` does. Every rank starts from rank 0's parameters.

Communication runs on its own thread (and, on a GPU, its own CUDA stream; the transport is
MPI_THREAD_MULTIPLE). With ``micro_batches=None`` compute keeps accumulating micro-batches
until the round in flight has finished (at least `min_micro_batches`, at most
`max_micro_batches`), so a fast rank contributes more micro-batches than a slow one and
the all-reduced count weights the average: ḡ = Σ_ranks Σ_micro-batches g / Σ_ranks count.
With ``micro_batches=n`` every phase computes exactly n micro-batches (deterministic; the
round still overlaps unless ``sync_comm=True``, which runs it on the calling thread).

Per-rank wire bytes of one round (n parameters, fp32 master, P ranks, B = 4n padded to a
multiple of P; params of s bytes per element): count all-reduce 2(P−1)/P·8, gradient
reduce-scatter (P−1)/P·B, parameter all-gather (P−1)/P·(s/4)·B. ZeRO-1 and DPU do one
round per step, ACCO two (≈ 2× the bytes of ZeRO-1, all of it overlapped with compute).

`stats()` reports compute time, communication-thread busy time, time the compute thread
waited for a round (the exposed communication), the overlapped fraction
1 − exposed/busy, micro-batches per round, and peak in-flight bytes (the largest single
operation on the wire). `state_dict()` is per rank (its shard, the moments, the pending
gradient buffer and counters) plus the model; load it on the same rank and world size.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from commrt import transports as T

from .base import LossFn, NextBatch, TrainingMethod
from .zero1 import MaskedAdamW, ParamLayout, Zero1Shard

__all__ = ["ACCO", "ZeRO1", "DPU"]

_MODES = ("acco", "zero1", "dpu")


class _ShardedOverlapDriver(TrainingMethod):
    """The shared engine of ACCO, ZeRO-1 and DPU (see the module docstring)."""

    mode = "acco"

    def __init__(self, model: nn.Module, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 process_group: Any = None, *, eps: float = 1e-8,
                 micro_batches: int | None = None, min_micro_batches: int = 1,
                 max_micro_batches: int = 64, sync_comm: bool = False,
                 master_dtype: torch.dtype | None = None):
        if micro_batches is not None and micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1 or None, got {micro_batches}")
        if not 1 <= min_micro_batches <= max_micro_batches:
            raise ValueError(f"need 1 <= min_micro_batches <= max_micro_batches, got "
                             f"{min_micro_batches}, {max_micro_batches}")
        self.model = model
        # A private communicator (collective split): the communication thread's collectives
        # can never interleave with collectives the caller issues on the same group.
        group_comm = T.for_group(process_group)
        self.comm = group_comm.split(0, group_comm.rank)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:   # one flat vector holds them all
            raise ValueError(f"all parameters must share one dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.layout = ParamLayout(params, self.comm.size)
        self.comm.check_uniform([self.layout.numel], "number of trainable parameters")
        self.master_dtype = master_dtype or torch.promote_types(self.layout.dtype, torch.float32)
        lo, hi = self.layout.shard_range(self.comm.rank)
        flat = self.layout.flat_params(self.master_dtype)
        # Every rank starts from rank 0's parameters, as DDP does.
        self.comm.ibroadcast(flat, 0, kind=f"{self.mode}_init").wait()
        self.layout.load_params(flat)
        mask = self.layout.decay_mask(self.master_dtype)[lo:hi].clone()
        self.shard = Zero1Shard([flat[lo:hi]], lambda masters: MaskedAdamW(
            masters, [mask], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.micro_batches = micro_batches
        self.min_micro_batches = min_micro_batches
        self.max_micro_batches = max_micro_batches
        self.sync_comm = sync_comm
        self.poll_interval = 1e-4  # seconds between MPI tests on the communication thread
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        if self.layout.device.type == "cuda" and not sync_comm:
            self._stream = torch.cuda.Stream(self.layout.device)
        # gradient sum and micro-batch count waiting for their round (ACCO: h_t; DPU: g_{t-1})
        self._pending: torch.Tensor | None = None
        self._pending_count = 0
        self.steps = 0
        self.history: list[dict[str, Any]] = []   # one entry per round
        self._stats = dict(step_s=0.0, compute_s=0.0, comm_s=0.0, wait_s=0.0,
                           micro_batches=0, rounds=0, peak_in_flight_bytes=0)

    # -- the communication round (runs on the communication thread) ---------------------

    def _round(self, grad_sum: torch.Tensor, count: int, dry_run: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else None
        if stream_ctx is not None:
            stream_ctx.__enter__()
        try:
            comm, kind = self.comm, self.mode
            peak = 0
            counts = torch.tensor([float(count)], dtype=torch.float64)
            before = T.wire.total_bytes()
            self._wait(comm.iallreduce(counts, kind=f"{kind}_count"))
            total = float(counts.item())
            shard = torch.empty(self.layout.shard_numel, dtype=self.master_dtype,
                                device=self.layout.device)
            mid = T.wire.total_bytes()
            self._wait(comm.ireduce_scatter(grad_sum, shard, kind=f"{kind}_reduce_scatter"))
            peak = max(peak, T.wire.total_bytes() - mid)
            shard.div_(total)
            new_shard = self.shard.update([shard], dry_run=dry_run)[0]
            full = torch.empty(self.layout.padded_numel, dtype=self.layout.dtype,
                               device=self.layout.device)
            mid = T.wire.total_bytes()
            self._wait(comm.iallgather(new_shard.to(self.layout.dtype), full,
                                       kind=f"{kind}_all_gather"))
            peak = max(peak, T.wire.total_bytes() - mid)
            if self._stream is not None:
                self._stream.synchronize()
        finally:
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)
        busy = time.perf_counter() - t0
        self._stats["comm_s"] += busy
        self._stats["rounds"] += 1
        self._stats["peak_in_flight_bytes"] = max(self._stats["peak_in_flight_bytes"], peak)
        self.history.append(dict(step=self.steps, dry_run=dry_run, local_count=count,
                                 global_count=total, seconds=busy,
                                 wire_bytes=T.wire.total_bytes() - before))
        return full

    def _wait(self, request) -> None:
        """Complete `request`. On the communication thread, poll with short sleeps rather
        than block in MPI_Wait: MPI's wait spins, and on a CPU-only rank that spinning
        thread would take cycles from the compute it is meant to hide behind."""
        if not threading.current_thread().name.startswith("commrt-"):
            request.wait()   # a synchronous round: nothing to leave the CPU to
            return
        while not request.test():
            time.sleep(self.poll_interval)

    # -- compute phases -------------------------------------------------------------------

    def _compute_one(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        inputs, targets = next_batch()
        loss = loss_fn(self.model(inputs), targets)
        loss.backward()
        return float(loss.detach())

    def _phase(self, round_args: tuple | None, next_batch: NextBatch, loss_fn: LossFn,
               overlap: bool = True):
        """Compute micro-batches while the round `round_args` (if any) runs.

        Returns (round result or None, gradient sum, micro-batch count, losses)."""
        future: Future | None = None
        result = None
        if round_args is not None:
            if self.sync_comm or not overlap:
                t0 = time.perf_counter()
                result = self._round(*round_args)
                self._stats["wait_s"] += time.perf_counter() - t0
            else:
                if self._stream is not None:
                    torch.cuda.current_stream(self.layout.device).synchronize()
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"commrt-{self.mode}")
                future = self._executor.submit(self._round, *round_args)
        losses: list[float] = []
        t0 = time.perf_counter()
        while True:
            n = len(losses)
            if self.micro_batches is not None:
                if n >= self.micro_batches:
                    break
            elif n >= self.max_micro_batches or (
                    n >= self.min_micro_batches and (future is None or future.done())):
                break
            losses.append(self._compute_one(next_batch, loss_fn))
        self._stats["compute_s"] += time.perf_counter() - t0
        if future is not None:
            t0 = time.perf_counter()
            result = future.result()
            self._stats["wait_s"] += time.perf_counter() - t0
        self._stats["micro_batches"] += len(losses)
        grads = self.layout.take_grads(self.master_dtype)
        return result, grads, len(losses), losses

    # -- the training-method interface -----------------------------------------------------

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        """One optimizer step; returns the mean loss of the micro-batches it consumed."""
        t0 = time.perf_counter()
        losses = self._step(next_batch, loss_fn)
        self.steps += 1
        self._stats["step_s"] += time.perf_counter() - t0
        return sum(losses) / len(losses)

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Timing and volume counters since the last reset (see the module docstring)."""
        s = dict(self._stats)
        s["steps"] = self.steps
        s["exposed_comm_s"] = s["wait_s"]
        s["overlap_fraction"] = (max(0.0, 1.0 - s["wait_s"] / s["comm_s"])
                                 if s["comm_s"] > 0 else 0.0)
        rounds = max(s["rounds"], 1)
        s["micro_batches_per_round"] = s["micro_batches"] / rounds
        if reset:
            for k in self._stats:
                self._stats[k] = 0 if isinstance(self._stats[k], int) else 0.0
        return s

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.mode, "model": self.model.state_dict(),
                "optimizer": self.shard.state_dict(),
                "pending_grad": None if self._pending is None else self._pending.clone(),
                "pending_count": self._pending_count, "steps": self.steps,
                "rank": self.comm.rank, "world_size": self.comm.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.mode:
            raise ValueError(f"checkpoint is of method {state.get('method')!r}, not {self.mode!r}")
        if state["world_size"] != self.comm.size or state["rank"] != self.comm.rank:
            raise ValueError(f"checkpoint of rank {state['rank']}/{state['world_size']} loaded "
                             f"on rank {self.comm.rank}/{self.comm.size}: sharded state is per "
                             "rank")
        self.model.load_state_dict(state["model"])
        self.shard.load_state_dict(state["optimizer"])
        self._pending = None if state["pending_grad"] is None else state["pending_grad"].clone()
        self._pending_count = int(state["pending_count"])
        self.steps = int(state["steps"])

    def close(self) -> None:
        """Stop the communication thread (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


class ACCO(_ShardedOverlapDriver):
    """ACCO: sharded AdamW whose two rounds per step (estimate, real) overlap compute.

    ``ACCO(model, lr, betas, weight_decay, process_group=None, *, mode="acco",
    micro_batches=None, min_micro_batches=1, max_micro_batches=64, sync_comm=False,
    eps=1e-8, master_dtype=None)``; ``mode="zero1"`` or ``"dpu"`` gives the baselines on
    the same code (also available as `ZeRO1` and `DPU`). See the module docstring for the
    update rules, the micro-batch modes and the per-round wire bytes.
    """

    mode = "acco"

    def __init__(self, model: nn.Module, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 process_group: Any = None, *, mode: str | None = None, **kwargs: Any):
        mode = mode or type(self).mode
        if mode not in _MODES:
            raise ValueError(f"unknown ACCO mode {mode!r}; expected one of {', '.join(_MODES)}")
        self.mode = mode
        if mode == "zero1" and kwargs.get("micro_batches") is None:
            kwargs["micro_batches"] = 1   # synchronous: nothing to accumulate behind
        super().__init__(model, lr, betas, weight_decay, process_group, **kwargs)

    def _step(self, next_batch: NextBatch, loss_fn: LossFn) -> list[float]:
        return {"acco": self._acco_step, "dpu": self._dpu_step,
                "zero1": self._zero1_step}[self.mode](next_batch, loss_fn)

    def _acco_step(self, next_batch: NextBatch, loss_fn: LossFn) -> list[float]:
        losses: list[float] = []
        if self._pending is None:
            # h_0: gradients at θ̃_0 = θ_0, with nothing to communicate yet.
            _, self._pending, self._pending_count, first = self._phase(None, next_batch, loss_fn)
            losses += first
        h, h_count = self._pending, self._pending_count
        # Round A (estimate θ̃_{t+1} from h_t) while computing g_t at θ_t.
        estimate, g, g_count, phase_a = self._phase((h, h_count, True), next_batch, loss_fn)
        self.layout.load_params(estimate)
        # Round B (θ_t -> θ_{t+1} with the mean over h_t and g_t) while computing h_{t+1}
        # at θ̃_{t+1}.
        real, h_next, h_next_count, phase_b = self._phase(
            (h + g, h_count + g_count, False), next_batch, loss_fn)
        self.layout.load_params(real)
        self._pending, self._pending_count = h_next, h_next_count
        return losses + phase_a + phase_b

    def _dpu_step(self, next_batch: NextBatch, loss_fn: LossFn) -> list[float]:
        args = None if self._pending is None else (self._pending, self._pending_count, False)
        new_params, g, g_count, losses = self._phase(args, next_batch, loss_fn)
        if new_params is not None:
            self.layout.load_params(new_params)
        self._pending, self._pending_count = g, g_count
        return losses

    def _zero1_step(self, next_batch: NextBatch, loss_fn: LossFn) -> list[float]:
        _, g, g_count, losses = self._phase(None, next_batch, loss_fn)
        t0 = time.perf_counter()
        new_params = self._round(g, g_count, False)
        self._stats["wait_s"] += time.perf_counter() - t0
        self.layout.load_params(new_params)
        return losses


class DPU(ACCO):
    """Delayed parameter update: θ_{t+1} = AdamW(θ_t, ḡ(θ_{t−1})), the round overlapping
    the compute of step t (no compensation of the one-step staleness). Same arguments as
    `ACCO`; one round per step. Equivalent to ``ACCO(..., mode="dpu")``."""

    mode = "dpu"


class ZeRO1(ACCO):
    """Synchronous ZeRO-1: `micro_batches` (default 1) micro-batches at θ_t, then the round,
    nothing overlapped: θ_{t+1} = AdamW(θ_t, ḡ(θ_t)). Same arguments as `ACCO`; equivalent
    to ``ACCO(..., mode="zero1")``."""

    mode = "zero1"
