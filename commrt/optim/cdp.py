"""Cyclic Data Parallelism (CDP): stage-wise gradient reduction spread over the step.

``CDP(model, optimizer, stages=K, rule="v1"|"v2", process_group=None, *, sharded=False,
workers_per_device=1, stagger=True, cost="params", sample_input=None)``

The `nn.Sequential` model is cut into K contiguous stages of balanced cost (`cost="params"`:
parameter count; `cost="flops"`: FLOPs of one forward of `sample_input`, counted per
child with torch's FlopCounterMode), and every step runs stage by stage: forward
F_0 .. F_{K−1}, backward B_{K−1} .. B_0. As soon as stage l's gradient is complete its
reduction starts on a `CyclicRing` (commrt.collectives.cyclic) and every later piece of
stage compute is followed by one `advance()`, so the 2(N−1) point-to-point transfers of
each stage are spread over the rest of the step and the next one instead of one burst at
the end. Update rules (ḡ_t: mean over ranks of the step-t gradients, docs/design.md §5):

- ``"v1"``: every stage is updated with ḡ_{t−1} (uniform one-step delay): its ring has a
  whole step of compute to hide behind. Step 0 computes only. All ranks stay identical.
- ``"v2"``: rank r updates stage l with the fresh ḡ_t if l ≥ K−1−r, with ḡ_{t−1}
  otherwise (a stage with no ḡ_{t−1} yet, at step 0, is left unchanged). Ranks therefore
  hold slightly different replicas, as the rule implies. To keep one communication
  schedule on every rank (deadlock freedom of the ring), every rank completes the step-t
  rings of all stages l ≥ K−N before the update, whether or not it uses them itself.

``sharded=True`` (v1 only: sharding needs every rank to apply the same update) keeps
ZeRO-1 style state (`commrt.optim.zero1.Zero1Shard`): the gradient ring runs in
reduce-scatter mode, rank r owns chunk (r+1) mod N of every stage (an fp32 master and the
optimizer's state for it), and the updated parameter chunks travel the same ring in
all-gather mode instead of a broadcast; stage l's parameters are awaited just before its
next forward. The optimizer over the masters: `optimizer(masters)` when `optimizer` is a
factory (a callable taking a parameter list; the preferred form), else the given
optimizer itself, its parameter groups replaced by one group of the masters with its
`defaults` (so an optimizer that caches its parameters at construction, such as LBFGS,
needs the factory form).

``workers_per_device=W`` runs W micro-batches (W workers sharing this device) per step,
staggered by 2K/W stage slots (``stagger=False``: all W in lockstep, the unstaggered
reference). The gradient is their mean. Staggering bounds the activations alive at once:
the peak of saved-for-backward bytes (counted with saved_tensors_hooks, parameters
excluded) is ≈ W·A/2 instead of W·A.

Per-rank wire bytes per step (B_l: bytes of stage l's gradient, element size s):
v1/v2: Σ_l 2(N−1)/N·B_l (the ring all-reduce, exact formula in cyclic.py); sharded:
Σ_l (N−1)/N·B_l for the gradients plus Σ_l (N−1)/N·B_l·(param size / s) for the
parameter shards, in 2(N−1) messages per stage either way.

`stats()`: step/compute time, exposed communication (time blocked on ring transfers),
the fraction of ring bytes that had already arrived when they were needed, peak in-flight
ring bytes and peak activation bytes. Multi-rank CDP does not delay the ranks' starts: on
separate devices the i/N shift of the paper only changes when the same transfers happen.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from commrt import transports as T
from commrt.collectives.cyclic import CyclicRing, chunk_bounds, owned_chunk

from .base import LossFn, NextBatch, TrainingMethod
from .zero1 import OptimizerFactory, ParamLayout, Zero1Shard

__all__ = ["CDP", "balanced_partition", "stage_costs", "ActivationMeter"]

_RULES = ("v1", "v2")


def balanced_partition(costs: Sequence[float], stages: int) -> list[tuple[int, int]]:
    """Split items with `costs` into `stages` contiguous non-empty groups minimising the
    largest group cost; returns [start, end) per group."""
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages (stages > layers)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-cost of cutting the first i items into k groups
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def stage_costs(model: nn.Sequential, cost: str = "params",
                sample_input: torch.Tensor | None = None) -> list[float]:
    """Cost of every child: its parameter count, or its forward FLOPs on `sample_input`."""
    children = list(model)
    if cost == "params":
        return [float(sum(p.numel() for p in c.parameters())) for c in children]
    if cost == "flops":
        if sample_input is None:
            raise ValueError('cost="flops" needs a sample_input for the dry forward')
        from torch.utils.flop_counter import FlopCounterMode

        out, x = [], sample_input
        with torch.no_grad():
            for child in children:
                counter = FlopCounterMode(display=False)
                with counter:
                    x = child(x)
                out.append(float(counter.get_total_flops()))
        return out
    raise ValueError(f"unknown cost {cost!r}; expected 'params' or 'flops'")


class ActivationMeter:
    """Bytes of tensors saved for backward that are alive now, and their peak.

    Used as ``with meter.hooks(): forward...``; parameters (storages in `exclude`) are
    not activations and are not counted; a storage saved twice is counted once.
    """

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}   # storage ptr -> [bytes, references]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def hooks(self):
        meter = self

        class _Held:
            __slots__ = ("tensor", "ptr", "__weakref__")

            def __init__(self, tensor: torch.Tensor, ptr: int | None):
                self.tensor, self.ptr = tensor, ptr

            def __del__(self):
                if self.ptr is not None:
                    meter._release(self.ptr)

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in meter.exclude or storage.nbytes() == 0:
                return _Held(t, None)
            entry = meter.live.get(ptr)
            if entry is None:
                meter.live[ptr] = [storage.nbytes(), 1]
                meter.current += storage.nbytes()
                meter.peak = max(meter.peak, meter.current)
            else:
                entry[1] += 1
            return _Held(t, ptr)

        def unpack(held):
            return held.tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class CDP(TrainingMethod):
    """Cyclic Data Parallelism over `process_group` (see the module docstring)."""

    def __init__(self, model: nn.Sequential, optimizer: torch.optim.Optimizer | OptimizerFactory,
                 stages: int = 2, rule: str = "v1", process_group: Any = None, *,
                 sharded: bool = False, workers_per_device: int = 1, stagger: bool = True,
                 cost: str = "params", sample_input: torch.Tensor | None = None,
                 tag: int = 2000):
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"CDP needs an nn.Sequential model to cut into stages, got "
                             f"{type(model).__name__}")
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if stages > len(model):
            raise ValueError(f"stages ({stages}) > layers ({len(model)}): every stage needs "
                             "at least one child module of the nn.Sequential")
        if rule not in _RULES:
            raise ValueError(f"unknown CDP rule {rule!r}; expected 'v1' or 'v2'")
        if sharded and rule != "v1":
            raise ValueError("sharded CDP supports rule='v1' only: under v2 ranks apply "
                             "different updates, so a rank cannot update a shard for all")
        if workers_per_device < 1:
            raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
        self.model = model
        self.rule = rule
        self.sharded = sharded
        self.workers = workers_per_device
        self.stagger = stagger
        # A private communicator (collective split): ring messages of this instance can
        # never be matched by another user of the group, nor by a later CDP whose tags
        # coincide while this one's last transfers are still in flight.
        group_comm = T.for_group(process_group)
        self.comm = group_comm.split(0, group_comm.rank)
        self.num_stages = stages
        children = list(model)
        self.bounds = balanced_partition(stage_costs(model, cost, sample_input), stages)
        self.stage_modules = [nn.Sequential(*children[a:b]) for a, b in self.bounds]
        # A parameter used by several stages belongs to the lowest one: its gradient is
        # complete only after that stage's backward, the last to run.
        seen: set[int] = set()
        self.stage_params: list[list[nn.Parameter]] = [[] for _ in range(stages)]
        for l in range(stages):
            for p in self.stage_modules[l].parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.stage_params[l].append(p)
        params = [p for ps in self.stage_params for p in ps]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.comm.check_uniform([len(children), stages] + [sum(p.numel() for p in ps)
                                                         for ps in self.stage_params],
                                "CDP model layout (layers, stages, parameters per stage)")
        with torch.no_grad():  # every rank starts from rank 0's parameters
            for p in params:
                self.comm.ibroadcast(p.data, 0, kind="cdp_init").wait()
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.stage_layouts = [ParamLayout(ps, dtype=self.dtype, device=self.device)
                              for ps in self.stage_params]
        self.stage_numel = [layout.numel for layout in self.stage_layouts]
        self.grad_dtype = torch.promote_types(self.dtype, torch.float32)
        N, r = self.comm.size, self.comm.rank
        self.span = stages * max(2 * (N - 1), 1)
        if tag + 3 * self.span > 32767:
            raise ValueError(f"{stages} stages on {N} ranks need MPI tags up to "
                             f"{tag + 3 * self.span}: lower `tag`")
        self.tag = tag
        if sharded:
            self.shard_bounds = [chunk_bounds(n, N)[owned_chunk(r, N)] for n in self.stage_numel]
            masters = [layout.flat_params(self.grad_dtype)[a:b]
                       for layout, (a, b) in zip(self.stage_layouts, self.shard_bounds)]
            make = _repointed(optimizer) if isinstance(optimizer, torch.optim.Optimizer) \
                else optimizer
            self.shard = Zero1Shard(masters, make)
            self.optimizer = self.shard.optimizer
        else:
            self.optimizer = (optimizer if isinstance(optimizer, torch.optim.Optimizer)
                              else optimizer(model.parameters()))
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.steps = 0
        self._cur_ring: CyclicRing | None = None    # carries ḡ_t (this step's gradient)
        self._prev_ring: CyclicRing | None = None   # carries ḡ_{t−1} while still in flight
        self._prev_bufs: list[torch.Tensor] | None = None
        self._param_ring: CyclicRing | None = None  # sharded: updated parameter chunks
        self._param_bufs: list[torch.Tensor] | None = None
        self._param_loaded: list[bool] = [True] * stages
        self._rings_seen: list[CyclicRing] = []
        self._stats = dict(step_s=0.0, compute_s=0.0, exposed_comm_s=0.0, ring_bytes=0,
                           overlapped_bytes=0, peak_in_flight_bytes=0,
                           peak_activation_bytes=0)

    # -- helpers ---------------------------------------------------------------------------

    def _active_rings(self) -> list[CyclicRing]:
        return [ring for ring in (self._prev_ring, self._cur_ring, self._param_ring)
                if ring is not None]

    def _note_in_flight(self) -> None:
        in_flight = sum(ring.in_flight_bytes for ring in self._active_rings())
        self._stats["peak_in_flight_bytes"] = max(self._stats["peak_in_flight_bytes"],
                                                  in_flight)

    def _advance(self) -> None:
        self._note_in_flight()   # what travelled during the compute just done
        t0 = time.perf_counter()
        for ring in self._active_rings():
            if ring.pending():
                ring.advance()
        self._stats["exposed_comm_s"] += time.perf_counter() - t0
        self._note_in_flight()

    def _poll_rings(self) -> None:
        """One non-blocking pass over every active ring; yields the CPU when nothing moved
        (the neighbours are computing)."""
        rings = self._active_rings()
        before = sum(ring.progress_events for ring in rings)
        for ring in rings:
            if ring.pending():
                ring.advance()
        if sum(ring.progress_events for ring in rings) == before:
            time.sleep(2e-5)

    def _drive_until(self, ring: CyclicRing, stage: int) -> None:
        """Complete `stage` of `ring`, progressing every active ring meanwhile (a rank must
        never block on one ring while a neighbour waits for it on another)."""
        t0 = time.perf_counter()
        while not ring.stage_done(stage):
            self._poll_rings()
        self._stats["exposed_comm_s"] += time.perf_counter() - t0

    def _drain(self, ring: CyclicRing | None) -> None:
        t0 = time.perf_counter()
        while ring is not None and ring.pending():
            self._poll_rings()
        self._stats["exposed_comm_s"] += time.perf_counter() - t0

    def _new_ring(self, tensors, mode: str, slot: int) -> CyclicRing:
        ring = CyclicRing(tensors, self.comm, mode=mode, average=(mode != "allgather"),
                          tag=self.tag + slot * self.span, kind=f"cdp_{mode}")
        self._rings_seen.append(ring)
        return ring

    def _slots(self) -> list[list[tuple[int, int]]]:
        """Per time slot, the (worker, op) pairs run in it; op j < K is forward of stage j,
        op j >= K backward of stage 2K−1−j."""
        K, W = self.num_stages, self.workers
        offsets = [(w * 2 * K) // W if self.stagger else 0 for w in range(W)]
        length = max(offsets) + 2 * K
        return [[(w, tau - offsets[w]) for w in range(W) if 0 <= tau - offsets[w] < 2 * K]
                for tau in range(length)]

    # -- the training-method interface -----------------------------------------------------

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        """One step: W micro-batches stage by stage, rings advanced between stage pieces,
        then the update by the rule. Returns the mean loss of the W micro-batches."""
        t_step = time.perf_counter()
        K, W = self.num_stages, self.workers
        slot = self.steps % 2
        cur_bufs = [torch.zeros(n, dtype=self.grad_dtype, device=self.device)
                    for n in self.stage_numel]
        self._cur_ring = self._new_ring(cur_bufs, "reduce_scatter" if self.sharded
                                        else "allreduce", slot)
        batches = [next_batch() for _ in range(W)]
        inputs: list[list[Any]] = [[None] * (K + 1) for _ in range(W)]
        outputs: list[list[Any]] = [[None] * K for _ in range(W)]
        losses: list[Any] = [None] * W
        backward_done = [0] * K
        meter = ActivationMeter(self._param_storages)
        for pieces in self._slots():
            for w, op in pieces:
                t0 = time.perf_counter()
                if op < K:
                    l = op
                    if not self._param_loaded[l]:
                        self._drive_until(self._param_ring, l)
                        self.stage_layouts[l].load_params(self._param_bufs[l])
                        self._param_loaded[l] = True
                        t0 = time.perf_counter()
                    x = batches[w][0] if l == 0 else outputs[w][l - 1]
                    if l > 0:
                        x = x.detach()
                        if x.is_floating_point():
                            x.requires_grad_(True)
                    inputs[w][l] = x
                    with meter.hooks():
                        out = self.stage_modules[l](x)
                        if l == K - 1:
                            losses[w] = loss_fn(out, batches[w][1])
                    outputs[w][l] = out
                else:
                    l = 2 * K - 1 - op
                    if l == K - 1:
                        losses[w].backward()
                    else:
                        grad = inputs[w][l + 1].grad if inputs[w][l + 1] is not None else None
                        if grad is not None and outputs[w][l].requires_grad:
                            outputs[w][l].backward(grad)
                    outputs[w][l] = None
                    inputs[w][l + 1] = None
                    backward_done[l] += 1
                    if backward_done[l] == W:
                        cur_bufs[l].copy_(self.stage_layouts[l].take_grads(
                            self.grad_dtype).mul_(1.0 / W))
                        self._cur_ring.start(l)
                self._stats["compute_s"] += time.perf_counter() - t0
            self._advance()
        self._stats["peak_activation_bytes"] = max(self._stats["peak_activation_bytes"],
                                                   meter.peak)
        self.last_peak_activation_bytes = meter.peak
        self._update(cur_bufs)
        self._prev_ring, self._prev_bufs = self._cur_ring, cur_bufs
        self._cur_ring = None
        self.steps += 1
        self._stats["step_s"] += time.perf_counter() - t_step
        return float(sum(float(x.detach()) for x in losses) / W)

    def _update(self, cur_bufs: list[torch.Tensor]) -> None:
        K, N, r = self.num_stages, self.comm.size, self.comm.rank
        has_prev = self._prev_bufs is not None
        if self.rule == "v2":
            for l in reversed(range(max(0, K - N), K)):
                self._drive_until(self._cur_ring, l)
        self._drain(self._prev_ring)
        self._prev_ring = None
        self._param_ring = None  # every stage's parameters were awaited by the forward
        if self.sharded:
            if not has_prev:
                return
            masters = self.shard.update([buf[a:b] for buf, (a, b)
                                         in zip(self._prev_bufs, self.shard_bounds)])
            self._param_bufs = []
            for l in range(K):
                buf = torch.zeros(self.stage_numel[l], dtype=self.dtype, device=self.device)
                a, b = self.shard_bounds[l]
                buf[a:b].copy_(masters[l])
                self._param_bufs.append(buf)
            self._param_ring = self._new_ring(self._param_bufs, "allgather", 2)
            self._param_ring.start()
            self._param_loaded = [False] * K
            return
        any_grad = False
        for l in range(K):
            fresh = self.rule == "v2" and l >= K - 1 - r
            source = cur_bufs[l] if fresh else (self._prev_bufs[l] if has_prev else None)
            self.stage_layouts[l].set_grads(source)
            any_grad = any_grad or source is not None
        if any_grad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flush(self) -> None:
        """Collective: complete every ring still in flight (the gradient travelling for
        the next update, sharded parameter chunks). `state_dict` calls it."""
        for ring in self._active_rings():
            self._drain(ring)
        self._prev_ring = None
        for l in range(self.num_stages):
            if not self._param_loaded[l]:
                self.stage_layouts[l].load_params(self._param_bufs[l])
                self._param_loaded[l] = True
        self._param_ring = None

    close = flush

    def stats(self, reset: bool = False) -> dict[str, float]:
        s = dict(self._stats)
        landed = sum(ring.landed_bytes for ring in self._rings_seen)
        overlapped = sum(ring.overlapped_bytes for ring in self._rings_seen)
        s["ring_bytes"] = landed
        s["overlapped_bytes"] = overlapped
        s["overlap_fraction"] = overlapped / landed if landed else 0.0
        s["steps"] = self.steps
        if reset:
            for k in self._stats:
                self._stats[k] = 0 if isinstance(self._stats[k], int) else 0.0
            for ring in self._rings_seen:
                ring.landed_bytes = ring.overlapped_bytes = 0
            self._rings_seen = [ring for ring in self._active_rings()]
        else:
            self._rings_seen = list(dict.fromkeys(
                [ring for ring in self._rings_seen if ring.landed_bytes] +
                self._active_rings()))
        return s

    def state_dict(self) -> dict[str, Any]:
        """Collective. Model, optimizer (this rank's shards when sharded), step counter,
        and the gradient still travelling for the next update (completed first)."""
        self.flush()
        return {"method": "cdp", "rule": self.rule, "sharded": self.sharded,
                "model": self.model.state_dict(),
                "optimizer": (self.shard if self.sharded else self.optimizer).state_dict(),
                "steps": self.steps, "rank": self.comm.rank, "world_size": self.comm.size,
                "pending_grad": None if self._prev_bufs is None
                else [b.clone() for b in self._prev_bufs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != "cdp" or state["rule"] != self.rule or \
                state["sharded"] != self.sharded:
            raise ValueError("checkpoint is not of this CDP configuration (rule/sharding)")
        if state["world_size"] != self.comm.size:
            raise ValueError(f"checkpoint of {state['world_size']} ranks loaded on "
                             f"{self.comm.size}")
        self.model.load_state_dict(state["model"])
        (self.shard if self.sharded else self.optimizer).load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        pending = state["pending_grad"]
        self._prev_ring = None
        self._prev_bufs = None if pending is None else [b.clone() for b in pending]
        self._param_ring, self._param_loaded = None, [True] * self.num_stages


def _repointed(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
    """A factory that hands `optimizer` itself over the given parameters: its groups and
    state replaced by one group of them with the optimizer's defaults (torch's own
    `add_param_group` fills the hyperparameters), no constructor call to guess."""
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        optimizer.param_groups.clear()
        optimizer.state.clear()
        optimizer.add_param_group({"params": params})
        return optimizer
    return make
