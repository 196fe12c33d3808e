"""The one interface every training method offers to a training loop.

A *method* owns everything that happens in one optimizer step of data-parallel training:
forward and backward on its micro-batches, the communication, and the parameter update.
`commrt.train` and the perf suite drive every method the same way::

    loss = method.step(next_batch, loss_fn)

`next_batch()` returns this rank's next micro-batch ``(inputs, targets)``; a method calls it
as many times as its step needs (ACCO, for instance, keeps accumulating micro-batches while
its communication is in flight). The loss of a micro-batch is ``loss_fn(model(inputs),
targets)``. `step` returns the mean loss of the micro-batches it consumed, on this rank.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
NextBatch = Callable[[], Batch]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class TrainingMethod(Protocol):
    """Drives one optimizer step; checkpointable through its state dict."""

    model: torch.nn.Module

    def step(self, next_batch: NextBatch, loss_fn: LossFn) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LocalGradientMethod:
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
