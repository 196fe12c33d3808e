"""EDiT and A-EDiT: local SGD with layer-wise overlapped synchronization and a
pseudo-gradient penalty (Cheng et al. 2024, "EDiT: A Local-SGD-Based Efficient Distributed
Training Method for Large Language Models"), on the 2-D hybrid mesh.

Mesh: ``m`` ranks per node (the shard group) form one *replica*; the ``R`` nodes are the
replicas. Inside a node, ranks stay identical: every inner step all-reduces (mean) the
gradients over the shard group. Across nodes, replicas drift for τ inner steps and are then
synchronized. The synchronization of one layer is sharded inside the node: the layer's
flattened parameters are cut into ``m`` slices and shard rank ``j`` synchronizes slice ``j``
with the ranks holding slice ``j`` on the other nodes (its replication group), then the
slices are all-gathered inside the node. Inter-node traffic per rank is thus 1/m of the
layer.

Schedule. ``warmup_steps`` synchronous steps (gradients all-reduced over all ranks), then
rounds of ``sync_interval`` (τ) local inner steps. After a round the synchronization is
*pending*; it runs during the next forward pass: a communication thread synchronizes layer
after layer (in module order) while forward pre-hooks wait for exactly the layer about to
run, so the first layers compute while later layers are still on the wire (the transport is
MPI_THREAD_MULTIPLE). `flush()` completes a pending synchronization at once (called by
`state_dict`, and by users before evaluation).

Synchronization of one layer (replica i, anchor θ_s = last synchronized parameters):

- pseudo-gradient Δ_i = θ_s − θ_i, norm x_i = ‖Δ_i‖ (the whole layer's norm);
- anomaly elimination (penalty on): per layer and replica an EWMA of x (α = 0.02):
  z = (x − μ)/√M2; x is an outlier if z > 3·max(1, std of the last W accepted z-scores),
  with no detection during the first W synchronizations (W = 120). Accepted values update
  μ ← μ + α(x−μ), M2 ← (1−α)(M2 + α·d·d') (d = x − μ_old, d' = x − μ_new). Outliers get
  weight 0 (so Δ_i = 0) and do not update the statistics. Every rank sees every replica's
  norm (all-gathered), so all ranks take identical decisions without further messages;
- weighted averaging: w_i = softmax_j(−x_j/T) over the accepted replicas (T = 1),
  Δ = Σ_i w_i Δ_i (an all-reduce of w_i·Δ_i over the replication group);
  without the penalty w_i = 1/R;
- clipping: Δ ← Δ·min(1, c/(‖Δ‖ + 1e-6)) (``clip=None`` disables);
- outer Nesterov SGD on θ_s: b ← μ·b + Δ; θ_s ← θ_s − η·(Δ + μ·b); then θ_i ← θ_s.

With τ = 1, no penalty, η = 1 and μ = 0 this is parameter averaging after every step.

A-EDiT (`AEDiT`): rounds last a wall-clock interval instead of τ steps, so fast ranks take
more inner steps than slow ones and nobody waits for the slowest rank's τ-th step. The
interval is agreed by all ranks: ``sync_seconds`` or, by default, τ × the all-reduced mean
step time measured during warm-up (or during a first round of τ steps when there is no
warm-up). One `AEDiT.step` call is one round (``last_round_steps`` micro-batches); the
ranks of one node end a round together (they share every inner step's gradients); with
``step_weighting`` the weights become w = (1−r)·w_norm + r·steps_i/Σ steps (r = 0.5).

Pseudo-gradient exchange (``exchange``): ``"dense"`` (an MPI all-reduce), ``"sparse"``
(`commrt.collectives.SparseAllreduce` with error feedback per layer slice, ``density``) or
``"quantized"`` (`commrt.collectives.quantized_allreduce`, ``bits``). Beyond the papers.

Per-rank wire bytes (n = parameters, 4-byte elements; layer l has s_l = ⌈n_l/m⌉ elements
per slice; P = m·R; integer division as the transport counts):

- warm-up step:       2(P−1)·4n // P
- inner step (m > 1): 2(m−1)·4n // m  (A-EDiT adds 2(m−1)·8 // m: the round-end flag)
- one synchronization, summed over layers:
      dense exchange     2(R−1)·4s_l // R
    + slice all-gather   (m−1)·4s_l
    + with the penalty (or step weighting): norm all-gathers (R−1)·16 per layer, and
      2·(2(m−1)·8 // m) for the two scalar all-reduces (norm, clip norm) inside the node
      (the clip all-reduce only when clip is set).
  With ``"sparse"`` or ``"quantized"`` the exchange term is that collective's volume
  (about 4ρ(R−1)/R·8 s_l bytes for SparDL, ≈ 2(R−1)/R·s_l·bits/8 for quantized): a dense
  exchange of 4s_l·2(R−1)/R bytes shrinks by ~1/(2ρ) or 32/bits.

``last_step_wire_bytes`` (bytes of the last `step` call, including the synchronization it
overlapped) and ``last_sync_wire_bytes`` hold these numbers, computed from the formulas.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from commrt import transports as T
from commrt.collectives import SparseAllreduce, quantized_allreduce
from commrt.transports import FlatLayout, flatten, unflatten_into

from .base import LossFn, NextBatch, TrainingMethod
from .mesh import HybridMesh, resolve_mesh

_EXCHANGES = ("dense", "sparse", "quantized")


class _AnomalyTracker:
    """EWMA statistics of one (layer, replica) pseudo-gradient norm."""

    def __init__(self, alpha: float, window: int):
        self.alpha, self.window = alpha, window
        self.mu = 0.0
        self.m2 = 0.0
        self.count = 0
        self.zs: deque[float] = deque(maxlen=window)

    def check(self, x: float, threshold: float) -> bool:
        """True if x is accepted (and then folded into the statistics)."""
        z = (x - self.mu) / math.sqrt(self.m2) if self.m2 > 0 else 0.0
        if self.count >= self.window and len(self.zs) > 0:
            spread = float(torch.tensor(list(self.zs), dtype=torch.float64).std()) \
                if len(self.zs) > 1 else 0.0
            if not math.isfinite(x) or z > threshold * max(1.0, spread):
                return False
        if not math.isfinite(x):
            return False
        if self.count == 0:
            self.mu = x
        else:
            d = x - self.mu
            self.mu += self.alpha * d
            self.m2 = (1 - self.alpha) * (self.m2 + self.alpha * d * (x - self.mu))
            self.zs.append(z)
        self.count += 1
        return True

    def state(self) -> dict:
        return {"mu": self.mu, "m2": self.m2, "count": self.count, "zs": list(self.zs)}

    def load(self, s: dict) -> None:
        self.mu, self.m2, self.count = s["mu"], s["m2"], s["count"]
        self.zs = deque(s["zs"], maxlen=self.window)


class _Layer:
    """Parameters directly owned by one module, flattened and sliced over the node: slice j
    is ``[j·s, (j+1)·s)`` of the layer's flat fp32 vector zero-padded to ``m·s``
    (s = ⌈numel/m⌉)."""

    def __init__(self, index: int, module: nn.Module, params: list[nn.Parameter], m: int, j: int):
        self.index, self.module, self.params = index, module, params
        self.layout = FlatLayout(params, world_size=m)
        self.numel = self.layout.numel
        self.slice = self.layout.shard_numel
        self.j = j
        self.lo = min(j * self.slice, self.numel)
        self.hi = min((j + 1) * self.slice, self.numel)
        self.anchor = torch.zeros(self.slice, dtype=torch.float32)   # θ_s, my slice
        self.momentum = torch.zeros(self.slice, dtype=torch.float32)
        self.residual = torch.zeros(self.slice, dtype=torch.float32)  # sparse/quantized EF
        self.trackers: list[_AnomalyTracker] = []
        self.synced: torch.Tensor | None = None   # full new layer, set by the comm thread
        self.ready = threading.Event()

    def flat(self, pad: bool = False) -> torch.Tensor:
        """The layer's parameters as one fp32 vector (``pad``: zero-padded to m·s)."""
        return self.layout.flatten([p.detach() for p in self.params], dtype=torch.float32,
                                   pad=pad)

    def my_slice(self) -> torch.Tensor:
        """A copy of this rank's slice (zeros past the layer's end)."""
        a, b = self.layout.shard_range(self.j)
        return self.flat(pad=True)[a:b].clone()

    def write(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            self.layout.unflatten_into(flat, self.params)


class EDiT(TrainingMethod):
    """EDiT training method (module docstring): ``step(next_batch, loss_fn) -> loss``.

    Args:
        model: the model (identical initial parameters are broadcast from world rank 0).
        inner_optimizer: a torch optimizer over ``model``'s parameters (e.g. AdamW).
        sync_interval: τ, inner steps between synchronizations (≥ 1).
        warmup_steps: synchronous data-parallel steps first.
        outer_lr, outer_momentum: Nesterov outer SGD (η, μ).
        clip: pseudo-gradient clipping threshold c (None: off).
        mesh / ranks_per_node / process_group: the 2-D mesh (see `HybridMesh`).
        penalty: anomaly elimination + softmax weighting + clipping (False: plain mean,
            no clipping).
        anomaly_alpha, anomaly_window, anomaly_threshold, temperature: the penalty's
            α = 0.02, W = 120, 3, T = 1.
        exchange: "dense" | "sparse" | "quantized"; density (sparse), bits (quantized).
        overlap: synchronize during the next forward on a thread (True) or at once.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer,
                 sync_interval: int, warmup_steps: int = 0, outer_lr: float = 0.7,
                 outer_momentum: float = 0.8, clip: float | None = 5.0, *,
                 mesh: HybridMesh | None = None, ranks_per_node: int | None = None,
                 process_group: Any = None, penalty: bool = True,
                 anomaly_alpha: float = 0.02, anomaly_window: int = 120,
                 anomaly_threshold: float = 3.0, temperature: float = 1.0,
                 exchange: str = "dense", density: float = 0.01, bits: int = 8,
                 overlap: bool = True, step_weighting: float = 0.0):
        if not isinstance(sync_interval, int) or sync_interval < 1:
            raise ValueError(f"sync_interval must be an int ≥ 1, got {sync_interval!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {warmup_steps}")
        if outer_lr <= 0 or not 0 <= outer_momentum < 1:
            raise ValueError(f"need outer_lr > 0 and 0 ≤ outer_momentum < 1, got "
                             f"{outer_lr}, {outer_momentum}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        if exchange not in _EXCHANGES:
            raise ValueError(f"exchange must be one of {_EXCHANGES}, got {exchange!r}")
        if not 0 <= step_weighting <= 1:
            raise ValueError(f"step_weighting must be in [0, 1], got {step_weighting}")
        if anomaly_window < 1 or temperature <= 0:
            raise ValueError("anomaly_window must be ≥ 1 and temperature > 0")
        self.mesh = resolve_mesh(mesh, ranks_per_node, process_group)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_interval = sync_interval
        self.warmup_steps = warmup_steps
        self.outer_lr, self.outer_momentum, self.clip = outer_lr, outer_momentum, clip
        self.penalty = penalty
        self.anomaly_alpha, self.anomaly_window = anomaly_alpha, anomaly_window
        self.anomaly_threshold, self.temperature = anomaly_threshold, temperature
        self.exchange, self.density, self.bits = exchange, density, bits
        self.overlap = overlap
        self.step_weighting = step_weighting

        m, R = self.mesh.ranks_per_node, self.mesh.num_nodes
        self.layers: list[_Layer] = []
        seen: set[int] = set()
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False)
                   if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                layer = _Layer(len(self.layers), module, own, m, self.mesh.shard_index)
                layer.trackers = [_AnomalyTracker(anomaly_alpha, anomaly_window)
                                  for _ in range(R)]
                self.layers.append(layer)
        if not self.layers:
            raise ValueError("the model has no trainable parameters")
        self.numel = sum(layer.numel for layer in self.layers)
        self._sparse = None
        if exchange == "sparse":
            self._sparse = SparseAllreduce(density, "spardl", group=self.mesh.replicate)
        self._grad_layout: FlatLayout | None = None   # of all layers' parameters, built once
        self._broadcast_parameters()
        for layer in self.layers:
            layer.anchor.copy_(layer.my_slice())
        self.steps = 0            # step() calls
        self.inner_steps = 0      # inner steps taken (micro-batches)
        self.local_steps = 0      # inner steps since the last synchronization
        self.syncs = 0
        self.pending = False
        self.last_step_wire_bytes = 0
        self.last_sync_wire_bytes = 0
        self.outliers: list[tuple[int, int, int]] = []   # (sync, layer, replica) excluded
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._syncing = False
        self._handles = [layer.module.register_forward_pre_hook(self._make_pre_hook(layer))
                         for layer in self.layers]

    # -- setup ------------------------------------------------------------------------

    def _broadcast_parameters(self) -> None:
        world = self.mesh.world
        if world.size == 1:
            return
        params = [p.detach() for layer in self.layers for p in layer.params]
        flat = flatten(params, dtype=torch.float32)
        world.ibroadcast(flat, 0, kind="edit.broadcast").wait()
        with torch.no_grad():
            unflatten_into(flat, params)

    # -- the training-method interface ---------------------------------------------------

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        """One inner step (synchronous during warm-up); a due synchronization of the
        replicas runs overlapped with this step's forward pass."""
        self.last_step_wire_bytes = 0
        loss = self._inner_step(next_batch, loss_fn)
        self.steps += 1
        if self.inner_steps > self.warmup_steps and self.local_steps >= self.sync_interval:
            self._request_sync()
        return loss

    def flush(self, force: bool = False) -> None:
        """Complete a pending synchronization now (collective). With ``force``, also
        synchronize the replicas when local steps were taken since the last
        synchronization (e.g. before a final evaluation). Afterwards every rank holds the
        synchronized parameters if a synchronization was pending or forced."""
        if force and not self.pending and not self._syncing and self.local_steps > 0 \
                and self.inner_steps > self.warmup_steps:
            self.pending = True
        if self.pending and not self._syncing:
            self._start_sync()
        self._finish_sync()

    def synchronize(self) -> None:
        """Collective: bring every replica to the synchronized parameters now (a forced
        `flush`), e.g. before a final evaluation."""
        self.flush(force=True)

    def state_dict(self) -> dict[str, Any]:
        """Model, inner optimizer, outer state (anchors, momenta, residuals, anomaly
        statistics), the sparse exchange's own adaptive state (``"sparse_reducer"``, None
        unless ``exchange="sparse"``) and counters. Collective: flushes a pending
        synchronization first."""
        self.flush()
        return {
            "model": self.model.state_dict(),
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "layers": [{"anchor": l.anchor.clone(), "momentum": l.momentum.clone(),
                        "residual": l.residual.clone(),
                        "trackers": [t.state() for t in l.trackers]} for l in self.layers],
            "counters": {"steps": self.steps, "inner_steps": self.inner_steps,
                         "local_steps": self.local_steps, "syncs": self.syncs},
            "sparse_reducer": None if self._sparse is None else self._sparse.state_dict(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._finish_sync()
        self.pending = False
        self.model.load_state_dict(state["model"])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"state has {len(state['layers'])} layers, model has "
                             f"{len(self.layers)}")
        for layer, s in zip(self.layers, state["layers"]):
            layer.anchor.copy_(s["anchor"])
            layer.momentum.copy_(s["momentum"])
            layer.residual.copy_(s["residual"])
            for t, ts in zip(layer.trackers, s["trackers"]):
                t.load(ts)
        c = state["counters"]
        self.steps, self.inner_steps = c["steps"], c["inner_steps"]
        self.local_steps, self.syncs = c["local_steps"], c["syncs"]
        if self._sparse is not None:
            self._sparse.load_state_dict(state["sparse_reducer"])
        self._load_extra_state(state.get("extra", {}))

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def close(self) -> None:
        """Remove the forward pre-hooks (after flushing)."""
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- inner steps ------------------------------------------------------------------

    def _inner_step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        if self.pending:
            self._start_sync()
        inputs, targets = next_batch()
        self.inner_optimizer.zero_grad(set_to_none=True)
        out = self.model(inputs)
        self._finish_sync()   # layers whose forward did not run (and no-overlap mode)
        loss = loss_fn(out, targets)
        loss.backward()
        warm = self.inner_steps < self.warmup_steps
        self._average_gradients(self.mesh.world if warm else self.mesh.shard,
                                "edit.warmup_all_reduce" if warm else "edit.inner_all_reduce")
        self.inner_optimizer.step()
        self.inner_steps += 1
        if warm:
            if self.inner_steps == self.warmup_steps:
                for layer in self.layers:   # the local phase starts from here
                    layer.anchor.copy_(layer.my_slice())
            self.local_steps = 0
        else:
            self.local_steps += 1
        return float(loss.detach())

    def _average_gradients(self, comm, kind: str) -> None:
        if comm.size == 1:
            return
        params = [p for layer in self.layers for p in layer.params]
        if self._grad_layout is None:
            self._grad_layout = FlatLayout(params)
        flat = self._grad_layout.flatten([None if p.grad is None else p.grad.detach()
                                          for p in params], dtype=torch.float32,
                                         device=params[0].device)
        comm.iallreduce(flat, kind=kind).wait()
        self.last_step_wire_bytes += 2 * (comm.size - 1) * 4 * flat.numel() // comm.size
        flat.div_(comm.size)
        for p, view in zip(params, self._grad_layout.views(flat)):
            g = view.to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    # -- synchronization ------------------------------------------------------------------

    def _request_sync(self) -> None:
        self.pending = True
        if not self.overlap:
            self._start_sync()
            self._finish_sync()

    def _make_pre_hook(self, layer: _Layer):
        def hook(module, args):
            if self._syncing:
                self._apply(layer, wait=True)
        return hook

    def _start_sync(self) -> None:
        self._syncing = True
        self.pending = False
        for layer in self.layers:
            layer.ready.clear()
            layer.synced = None
        self._sync_bytes = 0
        self._thread_error = None
        self._sync_weights_info = self._round_info()
        if self.overlap:
            self._thread = threading.Thread(target=self._sync_all, name="edit-sync", daemon=True)
            self._thread.start()
        else:
            self._sync_all()

    def _sync_all(self) -> None:
        try:
            for layer in self.layers:
                layer.synced = self._sync_layer(layer)
                layer.ready.set()
        except BaseException as exc:  # re-raised in the main thread
            self._thread_error = exc
            for layer in self.layers:
                layer.ready.set()
            raise

    def _apply(self, layer: _Layer, wait: bool) -> None:
        if layer.synced is None and not wait:
            return
        layer.ready.wait()
        if self._thread_error is not None:
            raise RuntimeError("EDiT synchronization failed") from self._thread_error
        if layer.synced is not None:
            layer.write(layer.synced[:layer.numel])
            layer.synced = None

    def _finish_sync(self) -> None:
        if not self._syncing:
            return
        for layer in self.layers:
            self._apply(layer, wait=True)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._syncing = False
        self.syncs += 1
        self.local_steps = 0
        self.last_sync_wire_bytes = self._sync_bytes
        self.last_step_wire_bytes += self._sync_bytes

    def _round_info(self) -> float:
        """This replica's weight input besides the norm: inner steps of the round."""
        return float(self.local_steps)

    def _needs_info(self) -> bool:
        return self.penalty or self.step_weighting > 0

    def _weights(self, layer: _Layer, info: torch.Tensor) -> torch.Tensor:
        """Replica weights from the all-gathered (norm, steps) rows; identical everywhere."""
        R = info.shape[0]
        norms, steps = info[:, 0], info[:, 1]
        if self.penalty:
            accepted = torch.tensor([layer.trackers[i].check(float(norms[i]),
                                                             self.anomaly_threshold)
                                     for i in range(R)])
            for i in range(R):
                if not accepted[i]:
                    self.outliers.append((self.syncs, layer.index, i))
            if not accepted.any():
                return torch.zeros(R, dtype=torch.float64)
            logits = torch.where(accepted, -norms / self.temperature,
                                 torch.tensor(-math.inf, dtype=torch.float64))
            w = torch.softmax(logits, dim=0)
        else:
            accepted = torch.ones(R, dtype=torch.bool)
            w = torch.full((R,), 1.0 / R, dtype=torch.float64)
        if self.step_weighting > 0:
            s = torch.where(accepted, steps, torch.zeros_like(steps))
            if s.sum() > 0:
                w = (1 - self.step_weighting) * w + self.step_weighting * s / s.sum()
        return w

    def _scalar_allreduce(self, value: float, kind: str) -> float:
        shard = self.mesh.shard
        if shard.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        shard.iallreduce(t, kind=kind).wait()
        self._sync_bytes += 2 * (shard.size - 1) * 8 // shard.size
        return float(t[0])

    def _sync_layer(self, layer: _Layer) -> torch.Tensor:
        """Synchronize one layer across replicas; returns the new full flat layer."""
        shard, replicate = self.mesh.shard, self.mesh.replicate
        R = replicate.size
        delta = layer.anchor - layer.my_slice()
        if self._needs_info():
            sq = self._scalar_allreduce(float(delta.double().pow(2).sum()), "edit.norm")
            row = torch.tensor([math.sqrt(sq), self._sync_weights_info], dtype=torch.float64)
            info = torch.empty(2 * R, dtype=torch.float64)
            if R > 1:
                replicate.iallgather(row, info, kind="edit.norms").wait()
                self._sync_bytes += (R - 1) * 16
            else:
                info.copy_(row)
            w = self._weights(layer, info.view(R, 2))
            contribution = delta * float(w[self.mesh.node_index])
        else:
            contribution = delta / R
        pseudo_grad = self._exchange(layer, contribution)
        if self.penalty and self.clip is not None:
            total = math.sqrt(self._scalar_allreduce(float(pseudo_grad.double().pow(2).sum()),
                                                     "edit.clip_norm"))
            pseudo_grad.mul_(min(1.0, self.clip / (total + 1e-6)))
        mu = self.outer_momentum
        if mu > 0:
            layer.momentum.mul_(mu).add_(pseudo_grad)
            pseudo_grad = pseudo_grad.add(layer.momentum, alpha=mu)
        layer.anchor.add_(pseudo_grad, alpha=-self.outer_lr)
        layer.anchor[layer.hi - layer.lo:].zero_()
        if shard.size > 1:
            full = torch.empty(shard.size * layer.slice, dtype=torch.float32)
            shard.iallgather(layer.anchor, full, kind="edit.slice_all_gather").wait()
            self._sync_bytes += (shard.size - 1) * 4 * layer.slice
            return full
        return layer.anchor.clone()

    def _exchange(self, layer: _Layer, contribution: torch.Tensor) -> torch.Tensor:
        """Σ over replicas of contribution (each replica's w_i·Δ_i)."""
        replicate = self.mesh.replicate
        R = replicate.size
        if R == 1:
            return contribution.clone()
        if self.exchange == "dense":
            out = contribution.clone()
            replicate.iallreduce(out, kind="edit.all_reduce").wait()
            self._sync_bytes += 2 * (R - 1) * 4 * out.numel() // R
            return out
        before = T.wire.total_bytes()
        scaled = contribution * R   # the collectives return the mean over replicas
        if self.exchange == "sparse":
            self._sparse(scaled, layer.residual, key=layer.index)
        else:
            quantized_allreduce(scaled, layer.residual, bits=self.bits, group=replicate)
        self._sync_bytes += T.wire.total_bytes() - before
        return scaled


class AEDiT(EDiT):
    """A-EDiT: EDiT with rounds of a fixed wall-clock length (module docstring).

    Extra args: ``sync_seconds`` (the round length; None: τ × the all-reduced mean local
    step time, measured in a first round of exactly τ local steps; warm-up steps are not
    timed, since their synchronous all-reduce would stretch every later round on a slow
    link), ``step_weighting`` r
    (default 0.5; 0 disables). One `step` call is one round after warm-up (one synchronous
    step during warm-up); ``last_round_steps`` tells how many micro-batches it consumed.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer,
                 sync_interval: int = 8, warmup_steps: int = 0, outer_lr: float = 0.7,
                 outer_momentum: float = 0.8, clip: float | None = 5.0, *,
                 sync_seconds: float | None = None, step_weighting: float = 0.5,
                 **kwargs: Any):
        if sync_seconds is not None and sync_seconds <= 0:
            raise ValueError(f"sync_seconds must be > 0, got {sync_seconds}")
        super().__init__(model, inner_optimizer, sync_interval, warmup_steps, outer_lr,
                         outer_momentum, clip, step_weighting=step_weighting, **kwargs)
        self.sync_seconds = sync_seconds
        self.last_round_steps = 0
        self._step_time_sum = 0.0
        self._step_time_count = 0

    def _agree_interval(self) -> None:
        mean_step = self._step_time_sum / max(1, self._step_time_count)
        t = torch.tensor([mean_step], dtype=torch.float64)
        world = self.mesh.world
        if world.size > 1:
            world.iallreduce(t, kind="aedit.time").wait()
            self.last_step_wire_bytes += 2 * (world.size - 1) * 8 // world.size
        self.sync_seconds = self.sync_interval * float(t[0]) / world.size

    def _round_over(self, mine: bool) -> bool:
        """Ranks of one node all-reduce every inner step's gradients, so they must take the
        same number of inner steps: the round ends for the node when it ends for any of its
        ranks (one 8-byte MAX all-reduce inside the node per inner step)."""
        shard = self.mesh.shard
        if shard.size == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], dtype=torch.float64)
        shard.iallreduce(flag, op="max", kind="aedit.round").wait()
        self.last_step_wire_bytes += 2 * (shard.size - 1) * 8 // shard.size
        return bool(flag[0] > 0)

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        """During warm-up one synchronous step; afterwards one round: inner steps until the
        agreed interval has elapsed (at least one), then the synchronization is due."""
        self.last_step_wire_bytes = 0
        if self.inner_steps < self.warmup_steps:
            loss = self._inner_step(next_batch, loss_fn)
            self.steps += 1
            self.last_round_steps = 1
            return loss
        calibrating = self.sync_seconds is None
        losses = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            losses.append(self._inner_step(next_batch, loss_fn))
            if calibrating:
                self._step_time_sum += time.perf_counter() - t0
                self._step_time_count += 1
                if len(losses) >= self.sync_interval:
                    break
            elif self._round_over(time.perf_counter() - start >= self.sync_seconds):
                break
        if calibrating:
            self._agree_interval()
        self.last_round_steps = len(losses)
        self.steps += 1
        self._request_sync()
        return sum(losses) / len(losses)

    def _extra_state(self) -> dict:
        return {"sync_seconds": self.sync_seconds, "step_time_sum": self._step_time_sum,
                "step_time_count": self._step_time_count}

    def _load_extra_state(self, extra: dict) -> None:
        self.sync_seconds = extra.get("sync_seconds", self.sync_seconds)
        self._step_time_sum = extra.get("step_time_sum", 0.0)
        self._step_time_count = extra.get("step_time_count", 0)
