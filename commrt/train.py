"""Train a small GPT data-parallel over MPI ranks with any of commrt's methods.

    mpirun -n 16 python -m commrt.train                       # tiny GPT, stdlib corpus, ddp
    mpirun -n 8 python -m commrt.train --method spardl --density 0.01 --steps 500
    mpirun -n 4 python -m commrt.train --data input.txt --model small --out runs/x --plot
    torchrun --nproc-per-node 4 -m commrt.train               # the same without mpirun
    python -m commrt.train --help

Each rank trains on its own shard of the data (commrt.data) with the method named by
``--method`` (commrt/optim/registry.py); the method owns the step (forward, backward,
communication, update; see commrt/optim/base.py). Rank 0 shows a progress bar (a plain line
per log interval when stdout is not a terminal) and writes ``metrics.jsonl``,
``summary.json`` and, with ``--plot``, ``loss.png`` into ``--out``. Bad arguments end every
rank with one line on stderr and exit code 2 before training starts.

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

The pieces around the loop live in commrt/training/: the command line (cli), joining the job
(distributed), checkpoints (checkpoint), and records, progress, summary and plot (metrics).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commrt.data import BatchSampler
from commrt.model import build_gpt, count_parameters, lm_loss
from commrt.optim.registry import MethodOptions, build_method
from commrt.training import checkpoint as ckpt
from commrt.training import metrics
from commrt.training.cli import PROG, UsageError, check_args, parse_args, usage_exit
from commrt.training.distributed import init_torch_distributed, join_world, set_threads


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one training job (every rank calls this); returns the summary (on every rank)."""
    # ---- setup: the job, the checked command line, the model, the method, the data
    args = parse_args(argv)
    comm = join_world(args.backend)
    rank, world_size = comm.rank, comm.size
    # Everything that can be wrong with the command line is checked here, identically on
    # every rank, before any rank builds a model or joins a process group.
    try:
        dataset, config = check_args(args, world_size)
    except UsageError as exc:
        usage_exit(str(exc), rank)
    threads = set_threads(args.threads, comm)
    process_group = init_torch_distributed(args.backend, comm)
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
    probe_batch = BatchSampler(dataset.val, args.batch_size, config.block_size, args.seed, 10**6)()
    compute = metrics.measure_compute(model, probe_batch, lm_loss)

    build_error = None
    try:
        method = build_method(args.method, model, MethodOptions.from_args(args), process_group)
    except ValueError as exc:
        build_error = str(exc)
    errors = comm.allgather_object(build_error)
    if any(errors):
        usage_exit(f"--method {args.method}: {next(e for e in errors if e)}", rank)

    sampler = BatchSampler(dataset.shard(rank, world_size), args.batch_size, config.block_size,
                           args.seed, stream=rank)
    val_sampler = BatchSampler(dataset.val, args.batch_size, config.block_size, args.seed,
                               stream=10**6 + 1 + rank)
    meter = metrics.Meter(world_size, args.batch_size * config.block_size, compute)
    log = metrics.MetricsLog(out, rank)
    step, start_val_loss = 0, None
    if args.resume:
        try:
            step, start_val_loss = ckpt.restore(ckpt.load_checkpoint(out, rank), args,
                                                world_size, method, sampler, meter)
        except UsageError as exc:
            usage_exit(str(exc), rank)
        log.resume(step)

    def mean_over_ranks(values: list[float]) -> list[float]:
        summed = comm.allreduce_object(np.asarray(values, dtype=np.float64))
        return (summed / world_size).tolist()

    def evaluate() -> float:
        local = metrics.evaluate_loss(method.model, val_sampler, args.eval_iters, lm_loss)
        return mean_over_ranks([local])[0]

    progress = metrics.Progress(args.steps, enabled=rank == 0 and not args.quiet)
    n_params = count_parameters(model)
    progress.message(
        f"{PROG}: method {args.method} | {world_size} ranks × {threads} thread(s) | "
        f"model {args.model} ({n_params / 1e6:.2f}M params, {config.n_layer} layers, "
        f"width {config.n_embd}, context {config.block_size}, vocab {config.vocab_size}) | "
        f"data {dataset.source} ({len(dataset.train):,} train / {len(dataset.val):,} val tokens) | "
        f"backend {args.backend} | out {out}")
    if step == 0:
        start_val_loss = evaluate()
        log.append({"step": 0, "loss": None, "val_loss": start_val_loss, "tokens": 0,
                    "wall_s": 0.0, "wire_bytes": 0.0, "wire_bytes_total": 0.0, "comm_s": 0.0})
        progress.message(f"step 0: val loss {start_val_loss:.4f}")

    # ---- steps
    consumed = 0

    def next_batch():
        nonlocal consumed
        consumed += 1
        return sampler()

    comm.barrier()
    meter.start()
    while step < args.steps:
        consumed = 0
        t0 = time.perf_counter()
        loss = method.step(next_batch, lm_loss)
        t1 = time.perf_counter()
        if not math.isfinite(loss):
            raise RuntimeError(f"rank {rank}: loss became {loss} at step {step + 1}")
        step += 1
        meter.step(loss, consumed, t0, t1)
        progress.step(step, loss, *meter.live())

        # ---- records, evaluation, checkpoints
        evaluate_now = step % args.eval_interval == 0 or step == args.steps
        if step % args.log_interval == 0 or evaluate_now:
            record, comm_ms = meter.record(step, mean_over_ranks)
            progress.record(step, record["loss"], record["tok_per_s"],
                            record["wire_bytes_per_step"] / 1e6, comm_ms)
            if evaluate_now:
                if step == args.steps:
                    # Local-SGD replicas differ between syncs: score the synchronized model.
                    method.synchronize()
                record["val_loss"] = evaluate()
                progress.message(f"step {step}: val loss {record['val_loss']:.4f}")
            log.append(record)
            meter.restart_clock()
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            ckpt.save_checkpoint(out, step, rank, comm, ckpt.capture(
                step, world_size, args, method, sampler, meter, start_val_loss))
            meter.restart_clock()
        if args.stop_at is not None and step >= args.stop_at and step < args.steps:
            progress.close()
            progress.message(f"stopped at step {step} (--stop-at)")
            return {"stopped_at": step, "records": log.records}

    # ---- summary
    progress.close()
    method.close()  # communication threads (ACCO, EDiT) end before MPI does
    totals, final = meter.totals, log.records[-1]
    summary = {
        "method": args.method, "world_size": world_size, "backend": args.backend,
        "model": args.model, "model_config": config.to_dict(), "parameters": n_params,
        "data": dataset.source, "steps": step, "seed": args.seed,
        "start_val_loss": start_val_loss, "final_val_loss": final["val_loss"],
        "final_loss": final["loss"], "tokens": totals["tokens"], "wall_s": totals["wall_s"],
        "tok_per_s": totals["tokens"] / max(totals["wall_s"], 1e-9),
        "wire_bytes_per_rank": totals["wire_bytes"],
        "wire_bytes_per_step": totals["wire_bytes"] / max(step, 1),
        "comm_s": totals["comm_s"], "compute_s_per_micro_batch": meter.fb_s,
        "threads_per_rank": threads, "out": str(out),
    }
    if rank == 0:
        title = f"{args.method}, {world_size} ranks, {args.model} GPT" if args.plot else None
        metrics.write_summary(summary, log.records, out, title, progress)
    summary["records"] = log.records
    return summary


if __name__ == "__main__":
    main()
