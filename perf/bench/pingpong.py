"""Raw mpi4py microbenchmark: point-to-point ping-pong and allreduce sweeps.

Needs only mpi4py and numpy (no torch, no commrt), so it starts fast on every rank and
the suite's runner, the link emulation and the α–β fit can be exercised without the rest
of commrt. Run under mpirun::

    mpirun -n 4 python -m perf.bench.pingpong --sizes 1k,64k,1m --json out.json

Records (one per op and size, written by rank 0): op ("pingpong" | "allreduce"),
impl "mpi4py", bytes (message / array size), count, dtype, time_us (one-way for
pingpong, per call for allreduce), algbw_gbps, busbw_gbps, world_size, wire_bytes
(bytes each rank puts on the wire per call, by the formulas of docs/design.md §5).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from perf.infra.units import bus_factor, parse_sizes


def _iterations(nbytes: int, budget_bytes: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, budget_bytes // max(nbytes, 1))))


def _repeats(nbytes: int) -> int:
    # Small messages are cheap to repeat and the most exposed to scheduling noise.
    return 5 if nbytes <= 128 * 1024 else 3


def _timed(comm: MPI.Comm, fn, iters: int, warmup: int, repeats: int = 3) -> float:
    """Seconds per call: the best of `repeats` timed loops (slowest rank of each loop).

    The best loop rather than the mean: on an oversubscribed machine a loop that another
    process preempted says nothing about the network.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        elapsed = comm.allreduce((time.perf_counter() - start) / iters, op=MPI.MAX)
        best = min(best, elapsed)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,1k,16k,128k,1m", help="comma list of byte sizes")
    parser.add_argument("--ops", default="pingpong,allreduce")
    parser.add_argument("--budget-mb", type=float, default=64.0,
                        help="bytes to move per size (caps iterations on slow links)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed loops per size, best kept (default 7 small / 3 large)")
    parser.add_argument("--peer", type=int, default=1, help="the rank rank 0 ping-pongs with")
    parser.add_argument("--json", default=None, help="write the records here (rank 0)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    peer = args.peer
    if size > 1 and not 0 < peer < size:
        raise SystemExit(f"--peer must be in [1, {size - 1}], got {peer}")
    records = []
    for op in args.ops.split(","):
        for nbytes in parse_sizes(args.sizes):
            count = max(1, nbytes // 4)
            buf = np.ones(count, dtype=np.float32)
            iters = _iterations(buf.nbytes, args.budget_mb * 2**20 / 3, 2, 50)
            if op == "pingpong":
                if size < 2:
                    continue

                def step(buf: np.ndarray = buf) -> None:
                    if rank == 0:
                        comm.Send(buf, dest=peer, tag=7)
                        comm.Recv(buf, source=peer, tag=7)
                    elif rank == peer:
                        comm.Recv(buf, source=0, tag=7)
                        comm.Send(buf, dest=0, tag=7)

                repeats = args.repeats or _repeats(buf.nbytes)
                seconds = _timed(comm, step, iters, 2, repeats) / 2     # one way
            elif op == "allreduce":
                def step(buf: np.ndarray = buf) -> None:
                    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

                seconds = _timed(comm, step, iters, 2, args.repeats or _repeats(buf.nbytes))
            else:
                raise ValueError(f"unknown op {op!r}: use pingpong, allreduce")
            factor = bus_factor(op, size)    # wire bytes per rank = factor x the array's
            algbw = buf.nbytes / seconds / 1e9
            records.append(dict(bench="mpi-raw", op=op, impl="mpi4py", bytes=int(buf.nbytes),
                                count=int(count), dtype="float32", time_us=seconds * 1e6,
                                algbw_gbps=algbw,
                                busbw_gbps=algbw * factor, world_size=size,
                                peer=peer if op == "pingpong" else None,
                                wire_bytes=float(factor * buf.nbytes), iters=iters))
    if rank == 0:
        for r in records:
            print(f"{r['op']:>10} {r['bytes']:>10} B  {r['time_us']:>11.1f} us  "
                  f"busbw {r['busbw_gbps']:.3f} GB/s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
