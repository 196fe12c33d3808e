"""Checkpoints of ``python -m commrt.train``: OUT/checkpoint/step-NNNNNNN/rank-NNNNN.pt, then
OUT/checkpoint/latest (the name of the newest complete step directory).

A rank's file is one `torch.save`d dict (`capture`) holding everything its next steps
depend on: ``step``, ``world_size``, ``args`` (the command line), ``method`` (the method's
state_dict: model, optimizer, error-feedback residuals, the collectives' adaptive state,
counters), ``sampler`` (the data position), ``torch_rng``/``python_rng``/``numpy_rng``,
``totals``/``pending`` (the metrics accounting, `commrt.training.metrics.Meter`) and
``start_val_loss``. So a resumed run is bit-identical to an uninterrupted one, except for
methods whose steps depend on wall-clock timing (aedit's rounds; acco/dpu accumulating
until a round finishes, without --micro-batches).
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import UsageError

# Arguments that must match between a checkpoint and the run that resumes it: everything
# the training math depends on. Output, logging, evaluation and checkpoint options may change.
RESUME_KEYS = ("method", "model", "n_layer", "n_head", "n_embd", "block_size", "dropout",
               "data", "vocab_size", "corpus_bytes", "batch_size", "accumulation_steps",
               "seed", "steps", "lr", "weight_decay", "beta1", "beta2", "grad_clip",
               "backend", "density", "teams", "reuse_steps", "reuse_eps", "topk", "chunk",
               "compression_decay", "value_bits", "no_sign", "flex_base", "sync_interval",
               "sync_seconds", "step_weighting", "warmup_steps", "outer_lr", "outer_momentum",
               "outer_clip", "exchange", "exchange_bits", "ranks_per_node", "stages", "rule",
               "sharded", "workers_per_device", "micro_batches")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data`, whenever the process dies."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture(step: int, world_size: int, args: argparse.Namespace, method, sampler, meter,
            start_val_loss: float | None) -> dict[str, Any]:
    """This rank's checkpoint state (see the module docstring)."""
    return {"step": step, "world_size": world_size, "args": vars(args),
            "method": method.state_dict(), "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(), "totals": meter.totals,
            "pending": meter.pending, "start_val_loss": start_val_loss}


def restore(state: dict[str, Any], args: argparse.Namespace, world_size: int, method, sampler,
            meter) -> tuple[int, float]:
    """Load `state` (from `load_checkpoint`) into the method, the sampler, the RNGs and the
    meter; (step, start_val_loss). UsageError if the checkpoint was made with other
    settings the training math depends on (`RESUME_KEYS`) or another world size."""
    saved_args = state["args"]
    mismatched = [k for k in RESUME_KEYS if saved_args.get(k) != getattr(args, k)]
    if state["world_size"] != world_size:
        mismatched.append(f"world size {state['world_size']} != {world_size}")
    if mismatched:
        raise UsageError(f"--resume: the checkpoint was made with other settings: "
                         f"{', '.join(mismatched)}")
    method.load_state_dict(state["method"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    meter.totals, meter.pending = state["totals"], state["pending"]
    return state["step"], state["start_val_loss"]


def save_checkpoint(out: Path, step: int, rank: int, comm, state: dict) -> None:
    """Every rank writes its file (temporary name, then rename); after all have, rank 0
    points `latest` at the new step and removes older steps. A crash at any moment leaves
    `latest` naming a complete checkpoint. Collective over `comm`."""
    root = out / "checkpoint"
    step_dir = root / f"step-{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(step_dir / f"rank-{rank:05d}.pt", buffer.getvalue())
    comm.barrier()
    if rank == 0:
        atomic_write_bytes(root / "latest", step_dir.name.encode())
        for old in root.glob("step-*"):
            if old.name != step_dir.name:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def load_checkpoint(out: Path, rank: int) -> dict:
    """This rank's state of the checkpoint `latest` names in OUT/checkpoint."""
    root = out / "checkpoint"
    step_dir = root / (root / "latest").read_text().strip()
    return torch.load(step_dir / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=False)
