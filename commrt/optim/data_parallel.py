"""Synchronous data parallelism: torch DDP + AdamW, optionally with a commrt DDP comm hook.

    method = DataParallel(model, lr=1e-3)                                   # `ddp`
    method = DataParallel.sparse(model, density=0.01, algorithm="spardl")  # `spardl`/...
    method = DataParallel.quantized(model, bits=8)                          # `quant8`/`quant1`
    loss = method.step(next_batch, loss_fn)

Every step: `accumulation_steps` micro-batches forward and backward (gradient
synchronisation only on the last, `no_sync` before), DDP reduces the gradient buckets
(a mean over ranks, through the process group or through the hook), optional global-norm
clipping, one AdamW step (decoupled weight decay on matrices and embeddings only, as in GPT-2).

Per-rank wire bytes per step, for a model of n parameters of 4 bytes on P ranks:
- dense (`ddp`): the allreduce's 2(P−1)/P · 4n (the transport's count for a ring allreduce);
- `spardl`: at most 4ρn·4(P−1)/P plus pack headers (Spar-Reduce-Scatter + Spar-All-Gather,
  docs/design.md §5; a pair is 2 words), `topka`: 2(P−1)ρn words, `gtopk`: 2ρn·log2 P words;
- `quant8`/`quant1`: the quantized two-phase allreduce, ≈ 2(P−1)/P · n · bits/8 plus one fp32
  scale per block.
(See `commrt.collectives` for the exact formulas; the training script measures the real
bytes with the transport's counters.)

`state_dict()` holds the model, the optimizer, the hook's error-feedback residuals and
adaptive state, and the step counter, so a resumed run continues bit-for-bit. One more piece
of state lives inside torch's DDP and cannot be saved: its gradient-bucket layout. DDP
starts with buckets in reverse parameter order and rebuilds them, after the first synced
backward, in the order gradients became ready. The compressing hooks work per bucket (SparDL's
per-rank chunks, the quantizer's blocks of 256), so a resumed run whose first step used the
initial layout would compress differently from the uninterrupted run, which had rebuilt long
before. So the first step after `load_state_dict` of a trained state first runs one synced
forward and backward on its first micro-batch with the hook's state, the gradients and the
RNG restored afterwards: it only lets DDP record the ready order, and the real step then uses
the rebuilt layout. That probe's traffic is counted in the wire bytes of that step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import LossFn, NextBatch, TrainingMethod


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies to `p`: tensors of 2+ dimensions (matrices,
    embeddings), as in GPT-2; not biases and norms. The one rule of every AdamW here."""
    return p.dim() >= 2


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: `weight_decay` where `decays`, none elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]


class DataParallel(TrainingMethod):
    """DDP over `process_group` (default: the default group) with AdamW.

    `comm_hook`/`hook_state`: a DDP communication hook and its state (`commrt.hooks`);
    None means DDP's own allreduce. `grad_clip` > 0 clips the global gradient norm after
    the reduction (every rank sees the same reduced gradient, so the clip is identical).
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                 grad_clip: float = 0.0, accumulation_steps: int = 1,
                 process_group: Any = None, comm_hook: Callable | None = None,
                 hook_state: Any = None, bucket_cap_mb: float = 25.0):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {grad_clip}")
        self.model = model
        self.ddp = DistributedDataParallel(model, process_group=process_group,
                                           bucket_cap_mb=bucket_cap_mb)
        self.hook_state = hook_state
        if comm_hook is not None:
            self.ddp.register_comm_hook(hook_state, comm_hook)
        self.optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr,
                                           betas=betas)
        self.grad_clip = grad_clip
        self.accumulation_steps = accumulation_steps
        self.steps = 0
        # True after loading a trained state: DDP's buckets are still in the initial layout
        # (module docstring).
        self._rebuild_buckets_first = False

    @classmethod
    def sparse(cls, model: nn.Module, *, density: float, algorithm: str = "spardl", teams: int = 1,
               process_group: Any = None, reuse_steps: int = 1, reuse_eps: float = 1.0,
               **kwargs: Any) -> DataParallel:
        """DDP whose buckets are reduced by `commrt.collectives.sparse_allreduce` with error
        feedback (`algorithm` spardl, topka or gtopk; residuals kept per bucket by the hook).
        reuse_steps / reuse_eps: threshold reuse (`hooks.SparseAllreduceState`; 1 = off)."""
        from commrt import hooks

        state = hooks.SparseAllreduceState(density, algorithm=algorithm, teams=teams,
                                           process_group=process_group,
                                           reuse_steps=reuse_steps, reuse_eps=reuse_eps)
        return cls(model, process_group=process_group, comm_hook=hooks.sparse_allreduce_hook,
                   hook_state=state, **kwargs)

    @classmethod
    def quantized(cls, model: nn.Module, *, bits: int, process_group: Any = None,
                  **kwargs: Any) -> DataParallel:
        """DDP whose buckets are reduced by the quantized two-phase allreduce (8, 4 or 1 bit)
        with error feedback."""
        from commrt import hooks

        state = hooks.QuantizedAllreduceState(bits, process_group=process_group)
        return cls(model, process_group=process_group, comm_hook=hooks.quantized_allreduce_hook,
                   hook_state=state, **kwargs)

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        total = 0.0
        for micro in range(self.accumulation_steps):
            inputs, targets = next_batch()
            if self._rebuild_buckets_first:
                self._rebuild_buckets(inputs, targets, loss_fn)
            last = micro == self.accumulation_steps - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss = loss_fn(self.ddp(inputs), targets)
                (loss / self.accumulation_steps).backward()
            total += float(loss.detach())
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return total / self.accumulation_steps

    def _rebuild_buckets(self, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: LossFn) -> None:
        """One synced forward/backward whose only effect is DDP's bucket rebuild (collective:
        every rank of a resumed run calls it in its first step). The hook's residuals and
        adaptive state, the gradients and the RNG streams are as before it."""
        params = list(self.model.parameters())
        saved = None if self.hook_state is None else self.hook_state.state_dict(params)
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            loss_fn(self.ddp(inputs), targets).backward()
        self.optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            self.hook_state.load_state_dict(saved, params)
        self._rebuild_buckets_first = False

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps, "hook_state": None if self.hook_state is None else
                self.hook_state.state_dict(list(self.model.parameters()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self._rebuild_buckets_first = self.steps > 0
        if self.hook_state is not None and state.get("hook_state") is not None:
            self.hook_state.load_state_dict(state["hook_state"], list(self.model.parameters()))
