"""ZeRO-1: this rank's shard of the optimizer state. The one implementation, used by ACCO,
ZeRO-1 and DPU (`commrt.optim.acco`) and by sharded CDP (`commrt.optim.cdp`).

A ZeRO-1 rank owns some slices of the flat parameter vector. It keeps a master copy of
them (float32, or float64 for float64 models) and the optimizer state for those masters
only; a reduce-scatter hands it the gradient of its slices, it updates the masters, and an
all-gather returns the updated slices to every rank's parameters. Which slices a rank owns
is the caller's choice: ACCO/ZeRO-1/DPU own block r of a padded flat layout
(``ParamLayout.shard_range``), CDP the chunk its ring's reduce-scatter leaves on the rank.

- ``ParamLayout(params, world_size=1, dtype=None, device=None)``: a `commrt.transports.FlatLayout`
  bound to a list of parameters: ``flat_params(dtype)``, ``take_grads(dtype)`` (flat
  gradient, ``None`` grads as zeros, then clears the ``.grad``\\s), ``load_params(flat)``,
  ``set_grads(flat)``, ``decay_mask(dtype)``.
- ``Zero1Shard(masters, make_optimizer)``: the masters as `nn.Parameter`\\s and
  ``make_optimizer(masters)``, any torch optimizer over them (the user's factory, or
  `MaskedAdamW`). ``update(grads, dry_run=False)`` steps it; a dry run restores the masters
  and the optimizer state bit-identically afterwards and returns the would-be masters.
- ``MaskedAdamW``: torch.optim.AdamW's formula (decoupled weight decay, bias correction)
  with a per-element weight-decay mask, as one flat shard mixes matrices (decayed) and
  biases or norms (not decayed).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from commrt.transports import FlatLayout

from .data_parallel import decays

__all__ = ["ParamLayout", "Zero1Shard", "MaskedAdamW", "OptimizerFactory"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class ParamLayout(FlatLayout):
    """A flat layout of `params` (``model.parameters()`` order), padded for `world_size`
    ranks. ``dtype``/``device`` (the default of `flat_params`, where buffers are made) are
    the first parameter's; an empty list needs them given."""

    def __init__(self, params: Sequence[nn.Parameter], world_size: int = 1, *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        if not params and (dtype is None or device is None):
            raise ValueError("a layout of no parameters needs a dtype and a device")
        super().__init__(params, world_size)
        self.params = list(params)
        self.dtype = params[0].dtype if params else dtype
        self.device = params[0].device if params else device

    def flat_params(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The padded flat vector of the parameters' values."""
        return self.flatten([p.detach() for p in self.params], dtype=dtype or self.dtype,
                            device=self.device)

    def take_grads(self, dtype: torch.dtype) -> torch.Tensor:
        """The padded flat gradient (accumulated ``.grad``s, None as zeros), then clears the
        ``.grad``s."""
        flat = self.flatten([p.grad for p in self.params], dtype=dtype, device=self.device)
        for p in self.params:
            p.grad = None
        return flat

    @torch.no_grad()
    def load_params(self, flat: torch.Tensor) -> None:
        """Copy `flat` (padded or not) into the parameters."""
        self.unflatten_into(flat, self.params)

    def set_grads(self, flat: torch.Tensor | None) -> None:
        """Set every ``.grad`` to its slot of `flat` (a copy in the parameter's dtype), or
        to None."""
        if flat is None:
            for p in self.params:
                p.grad = None
            return
        for p, g in zip(self.params, self.views(flat)):
            p.grad = g.to(p.dtype).clone()

    def decay_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """1 where weight decay applies (`data_parallel.decays`: 2+ dimensions), else 0."""
        return self.flatten([torch.ones_like(p) if decays(p) else None for p in self.params],
                            dtype=dtype, device=self.device)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW with a per-element weight-decay mask: for each parameter p (mask m),
    ``p ← p·(1 − lr·wd·m)``, then torch.optim.AdamW's bias-corrected Adam step.

    ``MaskedAdamW(params, decay_masks, *, lr, betas, eps, weight_decay)``: one mask per
    parameter, in order. State per parameter: ``exp_avg``, ``exp_avg_sq`` (created at once)
    and ``step`` (an int).
    """

    def __init__(self, params: Iterable[nn.Parameter], decay_masks: Sequence[torch.Tensor], *,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0 or eps <= 0:
            raise ValueError(f"need weight_decay >= 0 and eps > 0, got {weight_decay}, {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        ps = [p for group in self.param_groups for p in group["params"]]
        if len(decay_masks) != len(ps):
            raise ValueError(f"{len(decay_masks)} decay masks for {len(ps)} parameters")
        self.decay_masks = dict(zip(ps, decay_masks))
        for p in ps:
            self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                             "step": 0}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                     group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                state["step"] += 1
                t = state["step"]
                if wd:
                    p.mul_(1.0 - lr * wd * self.decay_masks[p])
                state["exp_avg"].mul_(b1).add_(grad, alpha=1.0 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                bias1 = 1.0 - b1 ** t
                bias2 = 1.0 - b2 ** t
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
        return loss


class Zero1Shard:
    """This rank's master slices and the optimizer over them (module docstring).

    `masters`: the slices' initial values in the master dtype (copied). `make_optimizer`:
    called once with the list of master parameters; returns the torch optimizer that
    updates them.
    """

    def __init__(self, masters: Sequence[torch.Tensor], make_optimizer: OptimizerFactory):
        self.masters = [nn.Parameter(m.detach().clone()) for m in masters]
        self.optimizer = make_optimizer(self.masters)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(self.optimizer).__name__}, "
                            "not a torch.optim.Optimizer")

    def update(self, grads: Sequence[torch.Tensor], dry_run: bool = False) -> list[torch.Tensor]:
        """One optimizer step with `grads` (one per master, same shapes); returns the new
        masters. ``dry_run=True``: the masters and the optimizer state are restored
        afterwards (bit-identical) and copies of the would-be masters returned."""
        if len(grads) != len(self.masters):
            raise ValueError(f"{len(grads)} shard gradients for {len(self.masters)} masters")
        for g, m in zip(grads, self.masters):
            if g.shape != m.shape:
                raise ValueError(f"shard gradient has shape {tuple(g.shape)}, expected "
                                 f"{tuple(m.shape)}")
        saved = self._snapshot() if dry_run else None
        for g, m in zip(grads, self.masters):
            m.grad = g.detach().clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if saved is None:
            return [m.detach() for m in self.masters]
        estimate = [m.detach().clone() for m in self.masters]
        self._restore(saved)
        return estimate

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        return [m.detach().clone() for m in self.masters], state

    @torch.no_grad()
    def _restore(self, saved: tuple[list[torch.Tensor], dict]) -> None:
        masters, state = saved
        for m, value in zip(self.masters, masters):
            m.copy_(value)
        for p in list(self.optimizer.state):
            if p in state:
                self.optimizer.state[p] = state[p]
            else:   # created by the dry step itself (a lazily initialised optimizer)
                del self.optimizer.state[p]

    def state_dict(self) -> dict[str, Any]:
        """The masters and the optimizer's state dict (copies)."""
        return {"masters": [m.detach().clone() for m in self.masters],
                "optimizer": _cloned(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["masters"]
        if len(saved) != len(self.masters) or any(
                s.shape != m.shape for s, m in zip(saved, self.masters)):
            raise ValueError(f"checkpoint shards have shapes {[tuple(s.shape) for s in saved]}, "
                             f"this rank's {[tuple(m.shape) for m in self.masters]}: was it "
                             "saved with another world size or rank?")
        with torch.no_grad():
            for m, s in zip(self.masters, saved):
                m.copy_(s)
        self.optimizer.load_state_dict(_cloned(state["optimizer"]))


def _cloned(obj: Any) -> Any:
    """`obj` with every tensor in nested dicts/lists/tuples cloned."""
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj
