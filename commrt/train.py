"""Train a small GPT data-parallel over MPI ranks with any of commrt's methods.

    mpirun -n 16 python -m commrt.train                       # tiny GPT, stdlib corpus, ddp
    mpirun -n 8 python -m commrt.train --method spardl --density 0.01 --steps 500
    mpirun -n 4 python -m commrt.train --data input.txt --model small --out runs/x --plot
    torchrun --nproc-per-node 4 -m commrt.train               # the same without mpirun
    python -m commrt.train --help

Each rank trains on its own shard of the data (commrt.data) with the method named by
``--method``; the method owns the step (forward, backward, communication, update; see
commrt/optim/base.py). Rank 0 shows a progress bar (a plain line per log interval when
stdout is not a terminal) and writes ``metrics.jsonl``, ``summary.json`` and, with
``--plot``, ``loss.png`` into ``--out``. Bad arguments end every rank with one line on
stderr and exit code 2 before training starts.

What the numbers mean:
- ``loss``: mean over ranks of the training loss of the steps since the previous record.
- ``val_loss``: mean over ranks of each rank's model on `--eval-iters` fixed validation
  batches (the same batches at every evaluation).
- ``wire_bytes``: bytes this rank put on the wire since the previous record, from the
  transport's counters (commrt.transports.wire), summed over ranks and divided by the world
  size. Control traffic of the script itself (metrics, evaluation) goes through raw MPI and is
  not counted. torch's gloo backend (``--backend gloo``) is invisible to the counters.
- ``comm_s``: exposed communication time, the step time minus the compute-only step time
  (docs/design.md §6). The compute-only time is measured once before training on a copy of the
  model: forward+backward per micro-batch plus one AdamW step, all ranks at once.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PROG = "commrt.train"


# --------------------------------------------------------------------------------------
# Which rank am I, before MPI is initialised (for printing errors once)


def _launcher_rank() -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
                 "SLURM_PROCID", "RANK"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def _yield_cpu_when_oversubscribed() -> None:
    """More ranks on this node than cores (or a launcher that does not say): let MPICH
    ranks that wait yield the core instead of spinning (read at MPI_Init, so before
    `T.world()`). An explicit setting wins."""
    from commrt.transports import oversubscribed

    if oversubscribed():
        os.environ.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")


def _started_by_torchrun() -> bool:
    """torchrun (or a launcher like it) started this process: RANK and WORLD_SIZE are
    set and no MPI launcher is present."""
    from commrt.transports import launched_by_mpi

    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not launched_by_mpi()


def _join_torchrun_world(backend: str) -> None:
    """Under torchrun the process group comes first: the commrt backend forms MPI's world
    through torch's store as it starts; with gloo, MPI's world is formed here through
    torchrun's store (MASTER_ADDR:MASTER_PORT)."""
    import torch.distributed as dist

    from commrt import transports as T

    if backend == "commrt":
        import commrt.backend  # noqa: F401  (registers the backend)
    dist.init_process_group(backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if size > 1 and not T.mpi_started():
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              size, False)
        T.pmi_bootstrap(dist.PrefixStore("commrt.train", store), rank, size)


class UsageError(ValueError):
    """A bad command line: one line on rank 0's stderr, exit code 2 on every rank."""


def _usage_exit(message: str, rank: int | None = None) -> NoReturn:
    if (_launcher_rank() if rank is None else rank) == 0:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse that prints (help, errors) on rank 0 only; errors are one line, exit 2."""

    def _print_message(self, message: str, file=None) -> None:
        if _launcher_rank() == 0:
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:
        _usage_exit(message)


# --------------------------------------------------------------------------------------
# Methods: one builder each, in one registry


@dataclass(frozen=True)
class MethodSpec:
    """A training method: where it lives (checked before training) and how to build it."""

    module: str
    attr: str
    build: Callable[[argparse.Namespace, Any, Context], Any]
    help: str


@dataclass
class Context:
    comm: Any            # commrt.transports Communicator of the whole job
    process_group: Any   # the torch.distributed default group
    rank: int
    world_size: int


def _adamw_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"lr": args.lr, "betas": (args.beta1, args.beta2), "weight_decay": args.weight_decay}


def _dp_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {**_adamw_kwargs(args), "grad_clip": args.grad_clip,
            "accumulation_steps": args.accumulation_steps}


def _build_ddp(args, model, ctx):
    from commrt.optim.data_parallel import DataParallel
    return DataParallel(model, process_group=ctx.process_group, **_dp_kwargs(args))


def _build_sparse(algorithm: str):
    def build(args, model, ctx):
        from commrt.optim.data_parallel import DataParallel
        return DataParallel.sparse(model, density=args.density, algorithm=algorithm,
                                   teams=args.teams, process_group=ctx.process_group,
                                   reuse_steps=args.reuse_steps, reuse_eps=args.reuse_eps,
                                   **_dp_kwargs(args))
    return build


def _build_quantized(bits: int):
    def build(args, model, ctx):
        from commrt.optim.data_parallel import DataParallel
        return DataParallel.quantized(model, bits=bits, process_group=ctx.process_group,
                                      **_dp_kwargs(args))
    return build


def _build_demo(args, model, ctx):
    from commrt.optim.base import LocalGradientMethod
    from commrt.optim.demo import DeMo
    optimizer = DeMo(model.parameters(), lr=args.lr, compression_decay=args.compression_decay,
                     compression_topk=args.topk, compression_chunk=args.chunk,
                     weight_decay=args.weight_decay, sign=not args.no_sign,
                     process_group=ctx.process_group, value_bits=args.value_bits)
    return LocalGradientMethod(model, optimizer)


def _build_flexdemo(args, model, ctx):
    from commrt.optim.base import LocalGradientMethod
    from commrt.optim.flexdemo import FlexDeMo
    optimizer = FlexDeMo(model.parameters(), lr=args.lr, ranks_per_node=args.ranks_per_node,
                         process_group=ctx.process_group, base=args.flex_base,
                         compression_decay=args.compression_decay, compression_topk=args.topk,
                         compression_chunk=args.chunk, weight_decay=args.weight_decay,
                         betas=(args.beta1, args.beta2), value_bits=args.value_bits)
    return LocalGradientMethod(model, optimizer)


def _edit_kwargs(args, ctx) -> dict[str, Any]:
    return {"warmup_steps": args.warmup_steps, "outer_lr": args.outer_lr,
            "outer_momentum": args.outer_momentum,
            "clip": args.outer_clip if args.outer_clip > 0 else None,
            "ranks_per_node": args.ranks_per_node, "process_group": ctx.process_group,
            "exchange": args.exchange, "density": args.density, "bits": args.exchange_bits}


def _build_edit(args, model, ctx):
    import torch

    from commrt.optim.edit import EDiT
    inner = torch.optim.AdamW(model.parameters(), **_adamw_kwargs(args))
    return EDiT(model, inner, args.sync_interval, **_edit_kwargs(args, ctx))


def _build_aedit(args, model, ctx):
    import torch

    from commrt.optim.edit import AEDiT
    inner = torch.optim.AdamW(model.parameters(), **_adamw_kwargs(args))
    # --sync-seconds 0: rounds of --sync-interval times the measured mean step time.
    return AEDiT(model, inner, args.sync_interval, sync_seconds=args.sync_seconds or None,
                 step_weighting=args.step_weighting, **_edit_kwargs(args, ctx))


def _build_acco(mode: str):
    def build(args, model, ctx):
        from commrt.optim.acco import ACCO
        return ACCO(model, lr=args.lr, betas=(args.beta1, args.beta2),
                    weight_decay=args.weight_decay, process_group=ctx.process_group, mode=mode,
                    micro_batches=args.micro_batches)
    return build


def _build_cdp(args, model, ctx):
    import torch

    from commrt.optim.cdp import CDP
    optimizer = torch.optim.AdamW(model.parameters(), **_adamw_kwargs(args))
    return CDP(model, optimizer, stages=args.stages, rule=args.rule,
               process_group=ctx.process_group, sharded=args.sharded,
               workers_per_device=args.workers_per_device)


METHODS: dict[str, MethodSpec] = {
    "ddp": MethodSpec("commrt.optim.data_parallel", "DataParallel", _build_ddp,
                      "torch DDP on the process group (dense allreduce) + AdamW"),
    "spardl": MethodSpec("commrt.hooks", "SparseAllreduceState", _build_sparse("spardl"),
                         "DDP + SparDL sparse allreduce hook (--density, --teams)"),
    "topka": MethodSpec("commrt.hooks", "SparseAllreduceState", _build_sparse("topka"),
                        "DDP + all-gather of every rank's top-k (--density)"),
    "gtopk": MethodSpec("commrt.hooks", "SparseAllreduceState", _build_sparse("gtopk"),
                        "DDP + global top-k by recursive doubling (--density)"),
    "quant8": MethodSpec("commrt.hooks", "QuantizedAllreduceState", _build_quantized(8),
                         "DDP + 8-bit quantized allreduce with error feedback"),
    "quant1": MethodSpec("commrt.hooks", "QuantizedAllreduceState", _build_quantized(1),
                         "DDP + 1-bit (sign) quantized allreduce with error feedback"),
    "demo": MethodSpec("commrt.optim.demo", "DeMo", _build_demo,
                       "DeMo: decoupled momentum, DCT top-k exchange (--topk, --chunk)"),
    "flexdemo": MethodSpec("commrt.optim.flexdemo", "FlexDeMo", _build_flexdemo,
                           "FlexDeMo: hybrid-sharded DeMo (--ranks-per-node, --topk, --chunk)"),
    "edit": MethodSpec("commrt.optim.edit", "EDiT", _build_edit,
                       "EDiT local SGD (--sync-interval, --warmup-steps, --ranks-per-node)"),
    "aedit": MethodSpec("commrt.optim.edit", "AEDiT", _build_aedit,
                        "A-EDiT time-based local SGD (--sync-seconds, --ranks-per-node)"),
    "acco": MethodSpec("commrt.optim.acco", "ACCO", _build_acco("acco"),
                       "ACCO: sharded AdamW, communication overlapped with accumulation"),
    "zero1": MethodSpec("commrt.optim.acco", "ACCO", _build_acco("zero1"),
                        "ZeRO-1: sharded AdamW state, no overlap"),
    "dpu": MethodSpec("commrt.optim.acco", "ACCO", _build_acco("dpu"),
                      "DPU: one-step delayed update without compensation"),
    "cdp": MethodSpec("commrt.optim.cdp", "CDP", _build_cdp,
                      "Cyclic Data Parallelism (--stages, --rule)"),
}


def check_method_available(name: str) -> None:
    """UsageError unless the method's module and class import (no silent fallback)."""
    spec = METHODS[name]
    required = [(spec.module, spec.attr)]
    if spec.module == "commrt.hooks":
        required.insert(0, ("commrt.optim.data_parallel", "DataParallel"))
    for module_name, attr in required:
        try:
            module = importlib.import_module(module_name)
            getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"method {name!r} is not available in this build: "
                             f"{module_name}.{attr} cannot be imported ({exc})") from None


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from commrt.model import PRESETS

    p = _Parser(prog=f"python -m {PROG}", description=(
        "Train a small GPT data-parallel over MPI ranks (launch with mpirun -n N). "
        "Defaults train the tiny preset on the Python standard library's sources."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="preset: " + "; ".join(
                       f"{k}: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads, context {c.block_size}"
                       for k, c in PRESETS.items()))
    g.add_argument("--n-layer", type=int, help="override the preset's number of blocks")
    g.add_argument("--n-head", type=int, help="override the preset's attention heads")
    g.add_argument("--n-embd", type=int, help="override the preset's width")
    g.add_argument("--block-size", type=int, help="override the preset's context length")
    g.add_argument("--dropout", type=float, default=0.0)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file (byte tokens), .bin file of uint16 tokens, or a "
                   "directory with train.bin and val.bin; default: the Python stdlib sources")
    g.add_argument("--vocab-size", type=int, help="vocabulary size for .bin data "
                   "(default: largest token id + 1; 256 for text)")
    g.add_argument("--corpus-bytes", type=int, default=4 << 20,
                   help="bytes of the default stdlib corpus to use")
    g = p.add_argument_group("training")
    g.add_argument("--method", default="ddp", choices=list(METHODS),
                   help="; ".join(f"{k}: {s.help}" for k, s in METHODS.items()))
    g.add_argument("--steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    g.add_argument("--accumulation-steps", type=int, default=1,
                   help="micro-batches per step (ddp family)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="global gradient-norm clip after reduction (ddp family; 0: off)")
    g.add_argument("--seed", type=int, default=1337,
                   help="seeds the model, the data order and torch's RNG: same seed, same losses")
    g.add_argument("--backend", default="commrt", choices=["commrt", "gloo"],
                   help="torch.distributed backend for the default process group")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank (0: cores / ranks on this node, at least 1)")
    g = p.add_argument_group("method options")
    g.add_argument("--density", type=float, default=0.01,
                   help="fraction of gradient entries sent (spardl, topka, gtopk), in (0, 1]")
    g.add_argument("--teams", type=int, default=1, help="SparDL teams; must divide the world size")
    g.add_argument("--reuse-steps", type=int, default=1,
                   help="threshold reuse (spardl, topka, gtopk): a bucket's top-k thresholds "
                        "serve up to N steps while the candidate counts stay in "
                        "[k, (1+--reuse-eps)k]; same results, fewer full top-k searches; "
                        "1 turns it off")
    g.add_argument("--reuse-eps", type=float, default=1.0,
                   help="threshold reuse tolerance: candidates per row at most (1+eps)k "
                        "(finite, > 0)")
    g.add_argument("--topk", type=int, default=32, help="DCT coefficients kept per chunk (demo, flexdemo)")
    g.add_argument("--chunk", type=int, default=64, help="DCT chunk size (demo, flexdemo)")
    g.add_argument("--compression-decay", type=float, default=0.999,
                   help="momentum decay beta of DeMo/FlexDeMo")
    g.add_argument("--value-bits", type=int, default=32, choices=[32, 16, 8],
                   help="bits per transmitted DCT coefficient value (demo, flexdemo)")
    g.add_argument("--no-sign", action="store_true",
                   help="apply the decoded momentum itself, not its sign (demo)")
    g.add_argument("--flex-base", default="sign", choices=["sign", "sgd", "adamw"],
                   help="FlexDeMo's base step")
    g.add_argument("--sync-interval", type=int, default=8,
                   help="local steps between synchronisations (edit)")
    g.add_argument("--sync-seconds", type=float, default=1.0,
                   help="wall-clock seconds between synchronisations, agreed across ranks "
                        "(aedit; 0: --sync-interval times the mean local step time, measured in a "
                        "first round of --sync-interval steps)")
    g.add_argument("--step-weighting", type=float, default=0.5,
                   help="A-EDiT's weight r of local step counts in the pseudo-gradient average")
    g.add_argument("--warmup-steps", type=int, default=10,
                   help="synchronous steps before local steps start (edit, aedit)")
    g.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov lr (edit, aedit)")
    g.add_argument("--outer-momentum", type=float, default=0.8,
                   help="outer Nesterov momentum (edit, aedit)")
    g.add_argument("--outer-clip", type=float, default=5.0,
                   help="pseudo-gradient norm clip c (edit, aedit; 0: off)")
    g.add_argument("--exchange", default="dense", choices=["dense", "sparse", "quantized"],
                   help="pseudo-gradient exchange (edit, aedit): dense allreduce, "
                   "sparse_allreduce at --density, or quantized allreduce at --exchange-bits")
    g.add_argument("--exchange-bits", type=int, default=8, choices=[8, 4, 1],
                   help="bits of the quantized pseudo-gradient exchange (edit, aedit)")
    g.add_argument("--ranks-per-node", type=int,
                   help="ranks per emulated node of the 2-D mesh (flexdemo, edit, aedit); "
                   "must divide the world size; default: the real nodes (shared memory)")
    g.add_argument("--stages", type=int, default=2, help="pipeline stages (cdp)")
    g.add_argument("--rule", default="v1", choices=["v1", "v2"], help="CDP update rule")
    g.add_argument("--sharded", action="store_true",
                   help="CDP with ZeRO-1 style sharded optimizer state (rule v1)")
    g.add_argument("--workers-per-device", type=int, default=1,
                   help="CDP workers (staggered micro-batches) per device")
    g.add_argument("--micro-batches", type=int,
                   help="micro-batches per round (acco, zero1, dpu; default: ACCO adapts to "
                   "the communication time, ZeRO-1 uses 1)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output directory (default runs/<time>-<method>)")
    g.add_argument("--log-interval", type=int, default=10, help="steps per metrics record")
    g.add_argument("--eval-interval", type=int, default=50,
                   help="steps between validation evaluations (also at start and end)")
    g.add_argument("--eval-iters", type=int, default=4, help="validation batches per rank")
    g.add_argument("--plot", action="store_true", help="write loss.png (needs matplotlib)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a checkpoint every N steps into OUT/checkpoint (0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint; the result is "
                   "bit-identical to an uninterrupted run except for the timing-driven methods "
                   "(aedit; acco and dpu without --micro-batches)")
    g.add_argument("--stop-at", type=int,
                   help="stop after this step without finishing, as an interrupted run would "
                   "(for testing --resume)")
    return p


def _positive(args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Everything that can be checked without communicating; UsageError on the first problem."""
    from commrt.model import PRESETS
    _positive(args, ["steps", "batch_size", "accumulation_steps", "log_interval", "eval_interval",
                     "eval_iters", "teams", "reuse_steps", "topk", "chunk", "sync_interval",
                     "stages", "workers_per_device", "micro_batches",
                     "n_layer", "n_head", "n_embd", "block_size", "ranks_per_node", "corpus_bytes",
                     "vocab_size"])
    if not 0.0 < args.density <= 1.0:
        raise UsageError(f"--density must be in (0, 1], got {args.density}")
    if not (math.isfinite(args.reuse_eps) and args.reuse_eps > 0):
        raise UsageError(f"--reuse-eps must be > 0 and finite, got {args.reuse_eps}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.grad_clip < 0 or args.weight_decay < 0:
        raise UsageError("--grad-clip and --weight-decay must be >= 0")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.outer_clip < 0:
        raise UsageError(f"--outer-clip must be >= 0, got {args.outer_clip}")
    if not 0.0 <= args.step_weighting <= 1.0:
        raise UsageError(f"--step-weighting must be in [0, 1], got {args.step_weighting}")
    layers = (args.n_layer or PRESETS[args.model].n_layer) + 2   # embedding, blocks, head
    if args.method == "cdp" and args.stages > layers:
        raise UsageError(f"--stages {args.stages} exceeds the model's {layers} layers "
                         "(embedding, blocks, head)")
    if args.sync_seconds < 0:
        raise UsageError(f"--sync-seconds must be >= 0 (0: automatic), got {args.sync_seconds}")
    if args.ranks_per_node is not None and world_size % args.ranks_per_node:
        raise UsageError(f"--ranks-per-node {args.ranks_per_node} does not divide the world "
                         f"size {world_size}")
    if world_size % args.teams:
        raise UsageError(f"--teams {args.teams} does not divide the world size {world_size}")
    if args.topk > args.chunk and args.method in ("demo", "flexdemo"):
        raise UsageError(f"--topk {args.topk} exceeds --chunk {args.chunk}")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR, the run to continue")
    if args.resume and not (Path(args.out) / "checkpoint" / "latest").is_file():
        raise UsageError(f"--resume: no checkpoint in {args.out}/checkpoint")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise UsageError(f"--stop-at must be in [1, --steps], got {args.stop_at}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)")


def model_config(args: argparse.Namespace, vocab_size: int):
    from commrt.model import preset
    try:
        return preset(args.model, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      block_size=args.block_size, dropout=args.dropout, vocab_size=vocab_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def load_data(args: argparse.Namespace, world_size: int, block_size_of: Callable[[int], int]):
    from commrt.data import check_fits, load_dataset
    try:
        dataset = load_dataset(args.data, vocab_size=args.vocab_size, corpus_bytes=args.corpus_bytes)
        check_fits(dataset, world_size, block_size_of(dataset.vocab_size))
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return dataset


# --------------------------------------------------------------------------------------
# Distributed setup


def init_torch_distributed(backend: str, comm) -> Any:
    """The default process group over the MPI job (created once per process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != comm.size:
            raise RuntimeError("torch.distributed is initialised with another world size")
        return dist.group.WORLD
    if backend == "commrt":
        import commrt.backend  # noqa: F401  (registers the backend)
        dist.init_process_group("commrt")
    else:
        # gloo needs a store; rank 0 serves one and MPI tells the others where it is.
        from commrt.transports import mpi_tcp_store
        dist.init_process_group("gloo", store=mpi_tcp_store(comm), rank=comm.rank,
                                world_size=comm.size)
    return dist.group.WORLD


def _set_threads(requested: int, comm) -> int:
    """torch threads per rank. 0: the cores this process may use divided by the ranks on
    this machine, at least 1. Ranks on one machine are counted twice over, as MPI's
    shared-memory group and as the ranks reporting the same host name, and the larger count
    wins: with MPIR_CVAR_NOLOCAL or in separate network namespaces (the perf suite's link
    emulation) MPI puts every rank in a group of its own, and giving each the whole
    machine's cores oversubscribed it many times over."""
    import torch
    threads = requested
    if threads == 0:
        local = comm.split_shared_memory()
        shared_memory_ranks = local.size
        local.free()
        hosts = comm.allgather_object(socket.gethostname())
        same_host = hosts.count(socket.gethostname())
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(shared_memory_ranks, same_host))
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------------------
# Metrics, progress, plot


def _output_is_terminal() -> bool:
    """Whether what rank 0 prints ends up on a terminal. Under mpirun a rank's stdout is a
    pipe to the launcher, which copies it to its own stdout: so look at the launcher's
    (Linux /proc; on failure, assume not). COMMRT_PROGRESS=bar|lines overrides."""
    forced = os.environ.get("COMMRT_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    if sys.stdout.isatty():
        return True
    pid = os.getppid()
    for _ in range(4):   # rank -> hydra proxy -> mpiexec (a few levels at most)
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name.startswith(("mpiexec", "mpirun", "orterun", "prterun", "prte")):
                return os.readlink(f"/proc/{pid}/fd/1").startswith(("/dev/pts/", "/dev/tty"))
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class Progress:
    """Rank 0's live line: a redrawn bar on a terminal, one plain line per record otherwise."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = enabled and _output_is_terminal()

    def _line(self, step, loss, tok_s, wire_mb, comm_ms) -> str:
        return (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | "
                f"{tok_s:,.0f} tok/s | wire {wire_mb:.3f} MB/step | comm {comm_ms:.1f} ms/step")

    def step(self, step, loss, tok_s, wire_mb, comm_ms) -> None:
        if self.tty:
            width = 24
            filled = int(width * step / self.total)
            bar = "#" * filled + "-" * (width - filled)
            sys.stdout.write(f"\r[{bar}] " + self._line(step, loss, tok_s, wire_mb, comm_ms) + "\x1b[K")
            sys.stdout.flush()

    def record(self, step, loss, tok_s, wire_mb, comm_ms) -> None:
        if self.enabled and not self.tty:
            print(self._line(step, loss, tok_s, wire_mb, comm_ms), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\r\x1b[K" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def write_plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_wire) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    for ax, key, label in ((ax_time, "wall_s", "wall-clock (s)"),
                           (ax_wire, "wire_bytes_total", "wire bytes per rank (MB)")):
        scale = 1e-6 if key == "wire_bytes_total" else 1.0
        ax.plot([r[key] * scale for r in train], [r["loss"] for r in train], label="train")
        ax.plot([r[key] * scale for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint/step-NNNNNNN/rank-NNNNN.pt, then OUT/checkpoint/latest
#
# A rank's file holds everything its next steps depend on: the method's state_dict (model,
# optimizer, error-feedback residuals, the collectives' adaptive state, counters), the
# sampler's position and the torch/python/numpy RNG states. So a resumed run is bit-identical
# to an uninterrupted one, except for methods whose steps depend on wall-clock timing (aedit's
# rounds; acco/dpu accumulating until a round finishes, without --micro-batches).


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, step: int, rank: int, comm, state: dict) -> None:
    """Every rank writes its file (temporary name, then rename); after all have, rank 0
    points `latest` at the new step and removes older steps. A crash at any moment leaves
    `latest` naming a complete checkpoint."""
    import io

    import torch

    root = out / "checkpoint"
    step_dir = root / f"step-{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_write_bytes(step_dir / f"rank-{rank:05d}.pt", buffer.getvalue())
    comm.barrier()
    if rank == 0:
        _atomic_write_bytes(root / "latest", step_dir.name.encode())
        for old in root.glob("step-*"):
            if old.name != step_dir.name:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def load_checkpoint(out: Path, rank: int) -> dict:
    import torch

    root = out / "checkpoint"
    step_dir = root / (root / "latest").read_text().strip()
    return torch.load(step_dir / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=False)


# Arguments that must match between a checkpoint and the run that resumes it: everything
# the training math depends on. Output, logging, evaluation and checkpoint options may change.
_RESUME_KEYS = ("method", "model", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                "data", "vocab_size", "corpus_bytes", "batch_size", "accumulation_steps",
                "seed", "steps", "lr", "weight_decay", "beta1", "beta2", "grad_clip",
                "backend", "density", "teams", "reuse_steps", "reuse_eps", "topk", "chunk",
                "compression_decay", "value_bits", "no_sign", "flex_base", "sync_interval",
                "sync_seconds", "step_weighting", "warmup_steps", "outer_lr", "outer_momentum",
                "outer_clip", "exchange", "exchange_bits", "ranks_per_node", "stages", "rule",
                "sharded", "workers_per_device", "micro_batches")


# --------------------------------------------------------------------------------------
# Training


def _measure_compute(model, batch, loss_fn, repeats: int = 3) -> tuple[float, float]:
    """(seconds per micro-batch forward+backward, seconds per AdamW step) on a copy."""
    import torch

    probe = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-9)
    inputs, targets = batch
    fb, opt = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss_fn(probe(inputs), targets).backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:  # the first round warms up allocators
            fb.append(t1 - t0)
            opt.append(t2 - t1)
    return sorted(fb)[len(fb) // 2], sorted(opt)[len(opt) // 2]


def _evaluate(model, sampler, iters: int, loss_fn) -> float:
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(iters):
            inputs, targets = sampler.batch(i)
            total += float(loss_fn(model(inputs), targets))
    model.train(was_training)
    return total / iters


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training job (every rank calls this); returns the summary (on every rank)."""
    args = build_parser().parse_args(argv)
    _yield_cpu_when_oversubscribed()
    from commrt import transports as T

    if _started_by_torchrun():
        _join_torchrun_world(args.backend)
    comm = T.world()
    rank, world_size = comm.rank, comm.size

    # Everything that can be wrong with the command line is checked here, identically on
    # every rank, before any rank builds a model or joins a process group.
    try:
        validate_args(args, world_size)
        dataset = load_data(args, world_size,
                            lambda vocab: model_config(args, vocab).block_size)
        config = model_config(args, dataset.vocab_size)
        check_method_available(args.method)
    except UsageError as exc:
        _usage_exit(str(exc), rank)

    import numpy as np
    import torch

    from commrt.data import BatchSampler
    from commrt.model import build_gpt, count_parameters, lm_loss

    threads = _set_threads(args.threads, comm)
    process_group = init_torch_distributed(args.backend, comm)
    ctx = Context(comm=comm, process_group=process_group, rank=rank, world_size=world_size)

    if args.out is None:
        stamp = comm.bcast_object(_dt.datetime.now().strftime("%Y%m%d-%H%M%S"), 0)
        args.out = os.path.join("runs", f"{stamp}-{args.method}")
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = build_gpt(config, seed=args.seed)
    # A rank-dependent stream for whatever randomness the step itself uses (dropout), so
    # ranks do not drop the same units; the model weights above are identical on all ranks.
    torch.manual_seed(args.seed * 100003 + rank)

    compute_probe = _measure_compute(model, BatchSampler(dataset.val, args.batch_size,
                                                         config.block_size, args.seed, 10**6)(),
                                     lm_loss)

    build_error = None
    try:
        method = METHODS[args.method].build(args, model, ctx)
    except ValueError as exc:
        build_error = str(exc)
    errors = comm.allgather_object(build_error)
    if any(errors):
        _usage_exit(f"--method {args.method}: {next(e for e in errors if e)}", rank)

    sampler = BatchSampler(dataset.shard(rank, world_size), args.batch_size, config.block_size,
                           args.seed, stream=rank)
    val_sampler = BatchSampler(dataset.val, args.batch_size, config.block_size, args.seed,
                               stream=10**6 + 1 + rank)
    tokens_per_batch = args.batch_size * config.block_size

    # Counters carried across a resume.
    step = 0
    totals = {"tokens": 0, "wall_s": 0.0, "wire_bytes": 0.0, "comm_s": 0.0, "micro_batches": 0}
    pending = {"loss_sum": 0.0, "steps": 0, "tokens": 0, "wire": 0, "comm_s": 0.0, "wall_s": 0.0}
    start_val_loss = None
    metrics_path = out / "metrics.jsonl"
    records: list[dict] = []

    if args.resume:
        state = load_checkpoint(out, rank)
        saved_args = state["args"]
        mismatched = [k for k in _RESUME_KEYS if saved_args.get(k) != getattr(args, k)]
        if state["world_size"] != world_size:
            mismatched.append(f"world size {state['world_size']} != {world_size}")
        if mismatched:
            _usage_exit(f"--resume: the checkpoint was made with other settings: "
                        f"{', '.join(mismatched)}", rank)
        method.load_state_dict(state["method"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        step, totals, pending = state["step"], state["totals"], state["pending"]
        start_val_loss = state["start_val_loss"]
        if rank == 0 and metrics_path.exists():
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
            records = [r for r in records if r["step"] <= step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    consumed = [0]

    def next_batch():
        consumed[0] += 1
        return sampler()

    def allreduce_mean(values: list[float]) -> list[float]:
        summed = comm.allreduce_object(np.asarray(values, dtype=np.float64))
        return (summed / world_size).tolist()

    def evaluate() -> float:
        return allreduce_mean([_evaluate(method.model, val_sampler, args.eval_iters, lm_loss)])[0]

    def write_record(record: dict) -> None:
        records.append(record)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    progress = Progress(args.steps, enabled=rank == 0 and not args.quiet)
    n_params = count_parameters(model)
    progress.message(
        f"{PROG}: method {args.method} | {world_size} ranks × {threads} thread(s) | "
        f"model {args.model} ({n_params / 1e6:.2f}M params, {config.n_layer} layers, "
        f"width {config.n_embd}, context {config.block_size}, vocab {config.vocab_size}) | "
        f"data {dataset.source} ({len(dataset.train):,} train / {len(dataset.val):,} val tokens) | "
        f"backend {args.backend} | out {out}")

    if step == 0:
        start_val_loss = evaluate()
        write_record({"step": 0, "loss": None, "val_loss": start_val_loss, "tokens": 0,
                      "wall_s": 0.0, "wire_bytes": 0.0, "wire_bytes_total": 0.0, "comm_s": 0.0})
        progress.message(f"step 0: val loss {start_val_loss:.4f}")

    fb_s, opt_s = compute_probe
    comm.barrier()
    wire_before = T.wire.total_bytes()
    t_last = time.perf_counter()
    while step < args.steps:
        consumed[0] = 0
        t0 = time.perf_counter()
        loss = method.step(next_batch, lm_loss)
        t1 = time.perf_counter()
        if not math.isfinite(loss):
            raise RuntimeError(f"rank {rank}: loss became {loss} at step {step + 1}")
        step += 1
        exposed = max(0.0, (t1 - t0) - consumed[0] * fb_s - opt_s)
        wire_now = T.wire.total_bytes()
        pending["loss_sum"] += loss
        pending["steps"] += 1
        pending["tokens"] += consumed[0] * tokens_per_batch
        pending["wire"] += wire_now - wire_before
        pending["comm_s"] += exposed
        pending["wall_s"] += t1 - t_last
        t_last = t1
        wire_before = wire_now
        progress.step(step, loss, pending["tokens"] * world_size / max(pending["wall_s"], 1e-9),
                      pending["wire"] / pending["steps"] / 1e6, 1e3 * pending["comm_s"] / pending["steps"])

        evaluate_now = step % args.eval_interval == 0 or step == args.steps
        if step % args.log_interval == 0 or evaluate_now:
            loss_mean, tokens, wire_bytes, comm_s, wall_s = allreduce_mean(
                [pending["loss_sum"] / pending["steps"], pending["tokens"], pending["wire"],
                 pending["comm_s"], pending["wall_s"]])
            tokens *= world_size
            totals["tokens"] += int(round(tokens))
            totals["wall_s"] += wall_s
            totals["wire_bytes"] += wire_bytes
            totals["comm_s"] += comm_s
            record = {"step": step, "loss": loss_mean, "val_loss": None,
                      "tokens": totals["tokens"], "wall_s": totals["wall_s"],
                      "wire_bytes": wire_bytes, "wire_bytes_total": totals["wire_bytes"],
                      "comm_s": comm_s, "tok_per_s": tokens / max(wall_s, 1e-9),
                      "wire_bytes_per_step": wire_bytes / pending["steps"],
                      "step_ms": 1e3 * wall_s / pending["steps"]}
            progress.record(step, loss_mean, record["tok_per_s"], record["wire_bytes_per_step"] / 1e6,
                            1e3 * comm_s / pending["steps"])
            pending = {k: 0 if isinstance(v, int) else 0.0 for k, v in pending.items()}
            if evaluate_now:
                if step == args.steps and hasattr(method, "synchronize"):
                    # Local-SGD replicas differ between syncs: score the synchronized model.
                    method.synchronize()
                record["val_loss"] = evaluate()
                progress.message(f"step {step}: val loss {record['val_loss']:.4f}")
            write_record(record)
            t_last = time.perf_counter()  # evaluation and logging are not training time

        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save_checkpoint(out, step, rank, comm, {
                "step": step, "world_size": world_size, "args": vars(args),
                "method": method.state_dict(), "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(), "totals": totals, "pending": pending,
                "start_val_loss": start_val_loss})
            t_last = time.perf_counter()
        if args.stop_at is not None and step >= args.stop_at and step < args.steps:
            progress.close()
            progress.message(f"stopped at step {step} (--stop-at)")
            return {"stopped_at": step, "records": records}

    progress.close()
    if hasattr(method, "close"):
        method.close()  # communication threads (ACCO, EDiT) end before MPI does
    final = records[-1]
    summary = {
        "method": args.method, "world_size": world_size, "backend": args.backend,
        "model": args.model, "model_config": config.to_dict(), "parameters": n_params,
        "data": dataset.source, "steps": step, "seed": args.seed,
        "start_val_loss": start_val_loss, "final_val_loss": final["val_loss"],
        "final_loss": final["loss"], "tokens": totals["tokens"], "wall_s": totals["wall_s"],
        "tok_per_s": totals["tokens"] / max(totals["wall_s"], 1e-9),
        "wire_bytes_per_rank": totals["wire_bytes"],
        "wire_bytes_per_step": totals["wire_bytes"] / max(step, 1),
        "comm_s": totals["comm_s"], "compute_s_per_micro_batch": fb_s,
        "threads_per_rank": threads, "out": str(out),
    }
    if rank == 0:
        _atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if args.plot:
            write_plot(records, out / "loss.png",
                       f"{args.method}, {world_size} ranks, {args.model} GPT")
        progress.message(
            f"done: {step} steps in {totals['wall_s']:.1f}s | val loss {start_val_loss:.4f} -> "
            f"{final['val_loss']:.4f} | {summary['wire_bytes_per_step'] / 1e6:.3f} MB/step/rank on "
            f"the wire | exposed comm {totals['comm_s']:.1f}s | {out}")
    summary["records"] = records
    return summary


if __name__ == "__main__":
    main()
