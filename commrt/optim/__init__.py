"""Training methods: each owns a whole optimizer step (compute, communication, update).

Every method is a `TrainingMethod` (base.py); `registry` builds any of them by the name
``python -m commrt.train --method`` takes, for train and perf alike. The classes, for
direct use: `DataParallel` (DDP with or without a compressing hook), `DeMo` and
`FlexDeMo` (communicating optimizers, wrapped by `LocalGradientMethod`), `EDiT`/`AEDiT`
(local SGD on a `HybridMesh`), `ACCO`/`ZeRO1`/`DPU` (sharded AdamW, overlapped) and `CDP`.
"""
from .acco import ACCO, DPU, ZeRO1
from .base import LocalGradientMethod, TrainingMethod
from .cdp import CDP
from .data_parallel import DataParallel
from .demo import DeMo
from .edit import AEDiT, EDiT
from .flexdemo import FlexDeMo
from .mesh import HybridMesh
from .registry import METHODS, MethodOptions, build_method

__all__ = ["ACCO", "AEDiT", "CDP", "DPU", "DataParallel", "DeMo", "EDiT", "FlexDeMo",
           "HybridMesh", "LocalGradientMethod", "METHODS", "MethodOptions", "TrainingMethod",
           "ZeRO1", "build_method"]
