"""ZeRO-1 building blocks shared by ACCO, ZeRO-1 and DPU: a flat layout of a model's
parameters, and AdamW on this rank's slice of it.

Layout: the trainable parameters, flattened in `model.parameters()` order, form one vector
of n elements, padded with zeros to P·c (c = ⌈n/P⌉); rank r owns elements [r·c, (r+1)·c),
the block a reduce-scatter gives it. Its optimizer state is a master copy of that slice
(float32, or float64 for float64 models) and the AdamW moments for it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class FlatLayout:
    """Offsets of a model's trainable parameters in one padded flat vector."""

    def __init__(self, params: list[nn.Parameter], world_size: int):
        if not params:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"all parameters must share one dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.params = params
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self.world_size = world_size
        self.shard_numel = math.ceil(self.numel / world_size)
        self.padded_numel = self.shard_numel * world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def flatten(self, tensors: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """The padded flat vector of `tensors` (one per parameter; None counts as zeros)."""
        out = torch.zeros(self.padded_numel, dtype=dtype, device=self.device)
        offset = 0
        for p, t in zip(self.params, tensors):
            if t is not None:
                out[offset:offset + p.numel()].copy_(t.reshape(-1))
            offset += p.numel()
        return out

    def flat_params(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.flatten([p.detach() for p in self.params], dtype or self.dtype)

    def take_grads(self, dtype: torch.dtype) -> torch.Tensor:
        """The padded flat gradient (accumulated `.grad`s), then clears the `.grad`s."""
        flat = self.flatten([p.grad for p in self.params], dtype)
        for p in self.params:
            p.grad = None
        return flat

    @torch.no_grad()
    def load_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def decay_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """1 where weight decay applies (tensors of 2+ dimensions, as in GPT-2), else 0."""
        return self.flatten([torch.ones_like(p) if p.dim() >= 2 else None for p in self.params],
                            dtype)


class ShardedAdamW:
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) on one shard.

    `update(grad)` advances the state and returns the new master slice; with
    ``dry_run=True`` the state is copied, stepped and restored (the master, the moments
    and the step counter are bit-identical afterwards) and the would-be slice returned.
    """

    def __init__(self, master: torch.Tensor, decay_mask: torch.Tensor, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0 or eps <= 0:
            raise ValueError(f"need weight_decay >= 0 and eps > 0, got {weight_decay}, {eps}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.master = master
        self.decay_mask = decay_mask
        self.exp_avg = torch.zeros_like(master)
        self.exp_avg_sq = torch.zeros_like(master)
        self.step_count = 0

    def _apply(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        t = self.step_count
        if self.weight_decay:
            self.master.mul_(1.0 - self.lr * self.weight_decay * self.decay_mask)
        self.exp_avg.mul_(b1).add_(grad, alpha=1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        bias1 = 1.0 - b1 ** t
        bias2 = 1.0 - b2 ** t
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)

    def update(self, grad: torch.Tensor, dry_run: bool = False) -> torch.Tensor:
        if grad.shape != self.master.shape:
            raise ValueError(f"shard gradient has shape {tuple(grad.shape)}, expected "
                             f"{tuple(self.master.shape)}")
        if not dry_run:
            self._apply(grad)
            return self.master
        saved = (self.master.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone(),
                 self.step_count)
        self._apply(grad)
        estimate = self.master.clone()
        self.master.copy_(saved[0])
        self.exp_avg.copy_(saved[1])
        self.exp_avg_sq.copy_(saved[2])
        self.step_count = saved[3]
        return estimate

    def state_dict(self) -> dict[str, Any]:
        return {"master": self.master.clone(), "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone(), "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("master", "exp_avg", "exp_avg_sq"):
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"checkpoint {name} has shape {tuple(state[name].shape)}, "
                                 f"this rank's shard {tuple(getattr(self, name).shape)}: was "
                                 "it saved with another world size or rank?")
            getattr(self, name).copy_(state[name])
        self.step_count = int(state["step"])
