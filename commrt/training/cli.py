"""The command line of ``python -m commrt.train``: flags, their checks, model and data.

`parse_args` reads the flags; `check_args` checks everything that can be wrong with them
without communicating (identically on every rank, before any rank builds a model), loads
the data and resolves the model configuration. A bad command line ends every rank with one
line on rank 0's stderr and exit code 2 (`usage_exit`).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from commrt.optim.registry import METHODS, MethodUnavailable, check_method_available
from commrt.transports.rendezvous import launcher_rank

PROG = "commrt.train"


class UsageError(ValueError):
    """A bad command line: one line on rank 0's stderr, exit code 2 on every rank."""


def usage_exit(message: str, rank: int | None = None) -> NoReturn:
    """Exit 2 with `message` on stderr, printed by rank 0 (`rank`: this process's rank;
    None before MPI starts: the launcher's)."""
    if (launcher_rank() if rank is None else rank) == 0:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse that prints (help, errors) on rank 0 only; errors are one line, exit 2."""

    def _print_message(self, message: str, file=None) -> None:
        if launcher_rank() == 0:
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:
        usage_exit(message)


def build_parser() -> argparse.ArgumentParser:
    from commrt.model import PRESETS

    p = _Parser(prog=f"python -m {PROG}", description=(
        "Train a small GPT data-parallel over MPI ranks (launch with mpirun -n N). "
        "Defaults train the tiny preset on the Python standard library's sources."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="preset: " + "; ".join(
                       f"{k}: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads, "
                       f"context {c.block_size}"
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
    g.add_argument("--topk", type=int, default=32,
                   help="DCT coefficients kept per chunk (demo, flexdemo)")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (`argv`, default sys.argv[1:]); exit 2 on a bad flag."""
    return build_parser().parse_args(argv)


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
        dataset = load_dataset(args.data, vocab_size=args.vocab_size,
                               corpus_bytes=args.corpus_bytes)
        check_fits(dataset, world_size, block_size_of(dataset.vocab_size))
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return dataset


def check_args(args: argparse.Namespace, world_size: int) -> tuple[Any, Any]:
    """(dataset, model config) for a valid command line; UsageError on the first problem."""
    validate_args(args, world_size)
    dataset = load_data(args, world_size, lambda vocab: model_config(args, vocab).block_size)
    config = model_config(args, dataset.vocab_size)
    try:
        check_method_available(args.method)
    except MethodUnavailable as exc:
        raise UsageError(str(exc)) from None
    return dataset, config
