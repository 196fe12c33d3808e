"""The one interface every training method offers to a training loop.

A *method* owns everything that happens in one optimizer step of data-parallel training:
forward and backward on its micro-batches, the communication, and the parameter update.
`commrt.train` and the perf suite drive every method the same way::

    loss = method.step(next_batch, loss_fn)
    ...
    method.synchronize()     # before a final evaluation
    method.close()           # before MPI ends

`next_batch()` returns this rank's next micro-batch ``(inputs, targets)``; a method calls it
as many times as its step needs (ACCO, for instance, keeps accumulating micro-batches while
its communication is in flight). The loss of a micro-batch is ``loss_fn(model(inputs),
targets)``. `step` returns the mean loss of the micro-batches it consumed, on this rank.

Every method subclasses `TrainingMethod`: `step`, `state_dict` and `load_state_dict` are its
own; `synchronize`, `close` and `stats` have defaults (nothing to do, no counters) that a
method overrides where it has replicas to merge, threads or hooks to end, or counters.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
NextBatch = Callable[[], Batch]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingMethod(ABC):
    """Drives one optimizer step; checkpointable through its state dict."""

    model: torch.nn.Module

    @abstractmethod
    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        """One optimizer step; the mean loss of the micro-batches consumed on this rank."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything the next steps depend on (a resumed run continues bit-for-bit)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def synchronize(self) -> None:
        """Collective: leave every rank's `model` equal to the synchronized parameters
        (local-SGD methods, whose replicas drift between rounds). Default: nothing, the
        replicas never differ after a step."""
        return None

    def close(self) -> None:
        """End what the method runs besides its steps (communication threads, hooks)
        before MPI ends; idempotent. Default: nothing runs."""
        return None

    def stats(self, reset: bool = False) -> dict[str, float]:
        """The method's own timing and volume counters since the last reset (perf/ reads
        them), then reset them if `reset`. Default: no counters."""
        return {}


class LocalGradientMethod(TrainingMethod):
    """Backward on the local micro-batch, then a communicating optimizer's step.

    For optimizers that do their own communication (DeMo, FlexDeMo): gradients are never
    all-reduced here; ``optimizer.step()`` exchanges whatever the method sends.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float:
        inputs, targets = next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
