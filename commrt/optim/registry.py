"""Every training method by name: one registry for `python -m commrt.train` and perf/.

    options = MethodOptions(lr=1e-3, density=0.01)
    method = build_method("spardl", model, options, process_group)
    loss = method.step(next_batch, loss_fn)

`METHODS` maps a name (``--method`` of commrt.train) to a `MethodSpec`: the classes it needs
(checked by `check_method_available` before a job builds anything), a builder and a one-line
help. `MethodOptions` holds every knob a builder reads; its defaults are commrt.train's
command-line defaults, so a caller sets only what it changes. A builder imports its method
when called, so a method whose module is missing breaks only that method.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from .base import TrainingMethod

__all__ = ["METHODS", "MethodOptions", "MethodSpec", "MethodUnavailable", "build_method",
           "check_method_available"]


@dataclass(frozen=True)
class MethodOptions:
    """The settings the registered methods read (the flags of ``python -m commrt.train``
    of the same names, and defaults; the last block has no flag)."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0                 # ddp family; 0: off
    accumulation_steps: int = 1            # ddp family
    density: float = 0.01                  # spardl, topka, gtopk; edit's sparse exchange
    teams: int = 1                         # spardl
    reuse_steps: int = 1                   # spardl, topka, gtopk
    reuse_eps: float = 1.0
    topk: int = 32                         # demo, flexdemo
    chunk: int = 64
    compression_decay: float = 0.999
    value_bits: int = 32
    no_sign: bool = False                  # demo
    flex_base: str = "sign"                # flexdemo
    sync_interval: int = 8                 # edit, aedit
    sync_seconds: float = 1.0              # aedit; 0: measured
    step_weighting: float = 0.5            # aedit
    warmup_steps: int = 10                 # edit, aedit
    outer_lr: float = 0.7
    outer_momentum: float = 0.8
    outer_clip: float = 5.0                # 0: off
    exchange: str = "dense"                # edit, aedit: dense | sparse | quantized
    exchange_bits: int = 8
    ranks_per_node: int | None = None      # flexdemo, edit, aedit; None: the real nodes
    stages: int = 2                        # cdp
    rule: str = "v1"
    sharded: bool = False
    workers_per_device: int = 1
    micro_batches: int | None = None       # acco, zero1, dpu; None: adaptive (acco), 1 (zero1)
    # Not on commrt.train's command line (perf/ sets them):
    max_micro_batches: int = 64            # acco: cap of the adaptive accumulation
    sync_comm: bool = False                # acco, zero1, dpu: rounds on the compute thread
    stagger: bool = True                   # cdp: workers staggered (False: lockstep)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MethodOptions:
        """The options among `args` (a parsed commrt.train command line); others keep
        their defaults."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)


Builder = Callable[[nn.Module, MethodOptions, Any], TrainingMethod]


@dataclass(frozen=True)
class MethodSpec:
    """A method: the (module, class) pairs it needs, its builder, a one-line help.

    ``build(model, options, process_group)``: `process_group` is anything
    `commrt.transports.for_group` accepts (a torch.distributed group, a Communicator, None
    for the default group). A builder raises ValueError for options the method rejects."""

    requires: tuple[tuple[str, str], ...]
    build: Builder
    help: str


class MethodUnavailable(ImportError):
    """A registered method whose module or class cannot be imported in this build."""


def _adamw(model: nn.Module, o: MethodOptions):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas,
                             weight_decay=o.weight_decay)


def _dp_kwargs(o: MethodOptions) -> dict[str, Any]:
    return {"lr": o.lr, "betas": o.betas, "weight_decay": o.weight_decay,
            "grad_clip": o.grad_clip, "accumulation_steps": o.accumulation_steps}


def _build_ddp(model, o, group):
    from .data_parallel import DataParallel
    return DataParallel(model, process_group=group, **_dp_kwargs(o))


def _build_sparse(algorithm: str) -> Builder:
    def build(model, o, group):
        from .data_parallel import DataParallel
        return DataParallel.sparse(model, density=o.density, algorithm=algorithm,
                                   teams=o.teams, process_group=group,
                                   reuse_steps=o.reuse_steps, reuse_eps=o.reuse_eps,
                                   **_dp_kwargs(o))
    return build


def _build_quantized(bits: int) -> Builder:
    def build(model, o, group):
        from .data_parallel import DataParallel
        return DataParallel.quantized(model, bits=bits, process_group=group, **_dp_kwargs(o))
    return build


def _build_demo(model, o, group):
    from .base import LocalGradientMethod
    from .demo import DeMo
    optimizer = DeMo(model.parameters(), lr=o.lr, compression_decay=o.compression_decay,
                     compression_topk=o.topk, compression_chunk=o.chunk,
                     weight_decay=o.weight_decay, sign=not o.no_sign,
                     process_group=group, value_bits=o.value_bits)
    return LocalGradientMethod(model, optimizer)


def _build_flexdemo(model, o, group):
    from .base import LocalGradientMethod
    from .flexdemo import FlexDeMo
    optimizer = FlexDeMo(model.parameters(), lr=o.lr, ranks_per_node=o.ranks_per_node,
                         process_group=group, base=o.flex_base,
                         compression_decay=o.compression_decay, compression_topk=o.topk,
                         compression_chunk=o.chunk, weight_decay=o.weight_decay,
                         betas=o.betas, value_bits=o.value_bits)
    return LocalGradientMethod(model, optimizer)


def _edit_kwargs(o: MethodOptions, group) -> dict[str, Any]:
    return {"warmup_steps": o.warmup_steps, "outer_lr": o.outer_lr,
            "outer_momentum": o.outer_momentum,
            "clip": o.outer_clip if o.outer_clip > 0 else None,
            "ranks_per_node": o.ranks_per_node, "process_group": group,
            "exchange": o.exchange, "density": o.density, "bits": o.exchange_bits}


def _build_edit(model, o, group):
    from .edit import EDiT
    return EDiT(model, _adamw(model, o), o.sync_interval, **_edit_kwargs(o, group))


def _build_aedit(model, o, group):
    from .edit import AEDiT
    # sync_seconds 0: rounds of sync_interval times the measured mean step time.
    return AEDiT(model, _adamw(model, o), o.sync_interval, sync_seconds=o.sync_seconds or None,
                 step_weighting=o.step_weighting, **_edit_kwargs(o, group))


def _build_acco(mode: str) -> Builder:
    def build(model, o, group):
        from .acco import ACCO
        return ACCO(model, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                    process_group=group, mode=mode, micro_batches=o.micro_batches,
                    max_micro_batches=o.max_micro_batches, sync_comm=o.sync_comm)
    return build


def _build_cdp(model, o, group):
    from .cdp import CDP
    return CDP(model, _adamw(model, o), stages=o.stages, rule=o.rule, process_group=group,
               sharded=o.sharded, workers_per_device=o.workers_per_device, stagger=o.stagger)


_DP = ("commrt.optim.data_parallel", "DataParallel")
_SPARSE = (_DP, ("commrt.hooks", "SparseAllreduceState"))
_QUANTIZED = (_DP, ("commrt.hooks", "QuantizedAllreduceState"))

METHODS: dict[str, MethodSpec] = {
    "ddp": MethodSpec((_DP,), _build_ddp,
                      "torch DDP on the process group (dense allreduce) + AdamW"),
    "spardl": MethodSpec(_SPARSE, _build_sparse("spardl"),
                         "DDP + SparDL sparse allreduce hook (--density, --teams)"),
    "topka": MethodSpec(_SPARSE, _build_sparse("topka"),
                        "DDP + all-gather of every rank's top-k (--density)"),
    "gtopk": MethodSpec(_SPARSE, _build_sparse("gtopk"),
                        "DDP + global top-k by recursive doubling (--density)"),
    "quant8": MethodSpec(_QUANTIZED, _build_quantized(8),
                         "DDP + 8-bit quantized allreduce with error feedback"),
    "quant1": MethodSpec(_QUANTIZED, _build_quantized(1),
                         "DDP + 1-bit (sign) quantized allreduce with error feedback"),
    "demo": MethodSpec((("commrt.optim.demo", "DeMo"),), _build_demo,
                       "DeMo: decoupled momentum, DCT top-k exchange (--topk, --chunk)"),
    "flexdemo": MethodSpec((("commrt.optim.flexdemo", "FlexDeMo"),), _build_flexdemo,
                           "FlexDeMo: hybrid-sharded DeMo (--ranks-per-node, --topk, --chunk)"),
    "edit": MethodSpec((("commrt.optim.edit", "EDiT"),), _build_edit,
                       "EDiT local SGD (--sync-interval, --warmup-steps, --ranks-per-node)"),
    "aedit": MethodSpec((("commrt.optim.edit", "AEDiT"),), _build_aedit,
                        "A-EDiT time-based local SGD (--sync-seconds, --ranks-per-node)"),
    "acco": MethodSpec((("commrt.optim.acco", "ACCO"),), _build_acco("acco"),
                       "ACCO: sharded AdamW, communication overlapped with accumulation"),
    "zero1": MethodSpec((("commrt.optim.acco", "ACCO"),), _build_acco("zero1"),
                        "ZeRO-1: sharded AdamW state, no overlap"),
    "dpu": MethodSpec((("commrt.optim.acco", "ACCO"),), _build_acco("dpu"),
                      "DPU: one-step delayed update without compensation"),
    "cdp": MethodSpec((("commrt.optim.cdp", "CDP"),), _build_cdp,
                      "Cyclic Data Parallelism (--stages, --rule)"),
}


def check_method_available(name: str) -> None:
    """MethodUnavailable unless every module and class method `name` needs imports (no
    silent fallback to another method)."""
    for module_name, attr in METHODS[name].requires:
        try:
            getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise MethodUnavailable(f"method {name!r} is not available in this build: "
                                    f"{module_name}.{attr} cannot be imported ({exc})") from None


def build_method(name: str, model: nn.Module, options: MethodOptions | None = None,
                 process_group: Any = None) -> TrainingMethod:
    """Method `name` training `model` over `process_group` (collective: every rank of the
    group calls it with the same arguments). ValueError for options the method rejects."""
    return METHODS[name].build(model, options or MethodOptions(), process_group)
