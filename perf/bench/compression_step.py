"""DeMo's and FlexDeMo's compression cost per optimizer step, at one rank.

At one rank nothing travels, so an optimizer step is all compression: momentum update,
chunked DCT, per-chunk top-k, encode, inverse DCT of what was sent and of the decoded
mean, and the sign step. GPT `small` with fixed random gradients, one torch thread,
medians of wall and process-CPU time (CPU time is less disturbed by other jobs).

Usage::

    python -m perf.bench.compression_step [--steps 15] [--methods demo,flexdemo]

To compare two checkouts, run this module from each in turn, alternating (A B A B).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from commrt.model import build_gpt, preset
from commrt.optim.demo import DeMo
from commrt.optim.flexdemo import FlexDeMo


def build(method: str, params) -> torch.optim.Optimizer:
    if method == "demo":
        return DeMo(params, lr=1e-3, compression_topk=32, compression_chunk=64)
    # one node of one rank: FlexDeMo's shards are the whole model
    return FlexDeMo(params, lr=1e-3, ranks_per_node=1, compression_topk=32,
                    compression_chunk=64)


def time_steps(method: str, steps: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of `steps` optimizer steps after 3 warm-up steps."""
    model = build_gpt(preset("small"), seed=0)
    opt = build(method, model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    for _ in range(3):
        opt.step()
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        opt.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--methods", default="demo,flexdemo")
    args = p.parse_args()
    torch.set_num_threads(1)
    for method in args.methods.split(","):
        wall, cpu = time_steps(method, args.steps)
        print(f"{method}: step median {wall:.1f} ms wall, {cpu:.1f} ms CPU over {args.steps} "
              f"steps (GPT small, 1 thread)", flush=True)


if __name__ == "__main__":
    main()
