"""nccl-tests-style sweep of the dense collectives: raw mpi4py, the `commrt` backend and
torch `gloo`, side by side in one run.

    mpirun -n 4 python -m perf.bench.collectives --json OUT.json
    mpirun -n 4 python -m perf.bench.collectives --ops allreduce --sizes 1k,4k,1m,4m \\
        --impls mpi4py,commrt,gloo

The default process group is `commrt` (its rendezvous store agreed over MPI); gloo is a
second group on the same store (``dist.new_group(backend="gloo")``); raw mpi4py runs on
MPI_COMM_WORLD over the very same tensor memory. Per op and size every implementation is
timed in turn, `--repeats` loops each, and a loop's time is that of its slowest rank; the
best loop is reported (on a shared machine a preempted loop says nothing about the
implementation).

Columns (rank 0 prints them; `--json` writes the records): size (bytes of the whole array:
allreduce/broadcast the buffer, allgather the output, reduce_scatter and alltoall the
input), count, type, time(us) per call, algbw = size/time, busbw = algbw x factor
(allreduce 2(P-1)/P; reduce_scatter, allgather, alltoall (P-1)/P; broadcast 1), and wire
bytes per rank per call: commrt's from the transport's counters, the others' by the same
formula (they use the same algorithms' volume).

Records: op (nccl-tests names: allreduce, allgather, reduce_scatter, alltoall, broadcast),
torch_op (all_reduce, all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single,
broadcast), impl, bytes, count, dtype, time_us, algbw_gbps, busbw_gbps, world_size,
wire_bytes, wire_source ("counter" | "formula"), iters, cpu_us (CPU time of the calling thread per
call, slowest rank). The run ends with the two target
numbers: all_reduce throughput commrt/mpi4py at >= 1 MiB, and commrt's per-call overhead
over mpi4py at <= 4 KiB.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from perf.infra.units import bus_factor, parse_sizes

OPS = {  # nccl-tests name -> torch.distributed name
    "allreduce": "all_reduce",
    "allgather": "all_gather_into_tensor",
    "reduce_scatter": "reduce_scatter_tensor",
    "alltoall": "all_to_all_single",
    "broadcast": "broadcast",
}
ALIASES = {v: k for k, v in OPS.items()} | {"all_gather": "allgather",
                                            "all_to_all": "alltoall"}
IMPLS = ("mpi4py", "commrt", "gloo")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32}


def formula_wire_bytes(op: str, nbytes: int, p: int) -> int:
    """Bytes one rank puts on the wire per call (transports/counters.py's rule)."""
    if op == "allreduce":
        return 2 * (p - 1) * nbytes // p
    if op in ("allgather", "reduce_scatter", "alltoall", "broadcast"):
        return (p - 1) * nbytes // p
    return nbytes


class Buffers:
    """The tensors one (op, size) point uses, shared by every implementation."""

    def __init__(self, op: str, nbytes: int, dtype: torch.dtype, p: int,
                 device: str | torch.device = "cpu", pinned: bool = False) -> None:
        es = torch.empty((), dtype=dtype).element_size()
        # whole-array size, rounded so that it splits evenly over the ranks
        count = max(p, (nbytes // es) // p * p)
        self.op, self.dtype, self.p = op, dtype, p
        self.count = count
        self.nbytes = count * es
        # sums of zeros stay finite; `pinned`: page-locked host memory (a CUDA staging area)
        zeros = lambda n: torch.zeros(n, dtype=dtype, device=device,  # noqa: E731
                                      pin_memory=pinned)
        if op in ("allreduce", "broadcast"):
            self.inp = self.out = zeros(count)
        elif op == "allgather":
            self.inp, self.out = zeros(count // p), zeros(count)
        elif op == "reduce_scatter":
            self.inp, self.out = zeros(count), zeros(count // p)
        else:  # alltoall
            self.inp, self.out = zeros(count), zeros(count)


def raw_call(op: str, b: Buffers) -> Callable[[], None]:
    """The blocking mpi4py call on `b`'s buffers. CUDA tensors go to MPI as they are
    (mpi4py reads their __cuda_array_interface__): only for a CUDA-aware MPI library."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    inp, out = (t.numpy() if t.device.type == "cpu" else t for t in (b.inp, b.out))
    if op == "allreduce":
        return lambda: comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    if op == "allgather":
        return lambda: comm.Allgather(inp, out)
    if op == "reduce_scatter":
        return lambda: comm.Reduce_scatter_block(inp, out, op=MPI.SUM)
    if op == "alltoall":
        return lambda: comm.Alltoall(inp, out)
    return lambda: comm.Bcast(out, root=0)


def torch_call(op: str, b: Buffers, group) -> Callable[[], None]:
    inp, out = b.inp, b.out
    if op == "allreduce":
        return lambda: dist.all_reduce(out, group=group)
    if op == "allgather":
        return lambda: dist.all_gather_into_tensor(out, inp, group=group)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(out, inp, group=group)
    if op == "alltoall":
        return lambda: dist.all_to_all_single(out, inp, group=group)
    return lambda: dist.broadcast(out, src=0, group=group)


def timed(fn: Callable[[], None], iters: int, mpi_comm) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the calling thread) per call of one loop, each as
    seen by the slowest rank. CPU time is the per-call cost a rank pays itself (Python
    overhead plus MPI's own work and polling), which a machine shared with other jobs
    inflates far less than wall time."""
    mpi_comm.Barrier()
    start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(iters):
        fn()
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    pairs = mpi_comm.allgather((elapsed, cpu))
    return max(w for w, _ in pairs) / iters, max(c for _, c in pairs) / iters


def iterations(nbytes: int, budget_mb: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, budget_mb * (1 << 20) // max(nbytes, 1))))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma list (nccl-tests or torch names)")
    ap.add_argument("--sizes", default="1k,4k,64k,256k,1m,4m", help="whole-array sizes")
    ap.add_argument("--impls", default="mpi4py,commrt,gloo", help=f"comma list of {IMPLS}")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5, help="timed loops per point (best kept)")
    ap.add_argument("--budget-mb", type=float, default=16.0,
                    help="bytes moved per timed loop (sets the iterations)")
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--max-iters", type=int, default=500)
    ap.add_argument("--json", default=None, help="write the records here (rank 0)")
    args = ap.parse_args(argv)

    ops = []
    for name in args.ops.split(","):
        name = name.strip()
        key = name if name in OPS else ALIASES.get(name)
        if key is None:
            raise SystemExit(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        ops.append(key)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")
    sizes = parse_sizes(args.sizes)
    dtype = DTYPES[args.dtype]

    import commrt.backend  # noqa: F401  (registers the backend)
    from commrt import transports as T

    dist.init_process_group("commrt")
    from mpi4py import MPI

    mpi_comm = MPI.COMM_WORLD
    rank, p = dist.get_rank(), dist.get_world_size()
    commrt_pg = dist.group.WORLD
    gloo_pg = dist.new_group(backend="gloo") if "gloo" in impls else None

    if rank == 0:
        debug = os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF")
        print(f"# perf.bench.collectives: {p} ranks, {socket.gethostname()}, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"TORCH_DISTRIBUTED_DEBUG={debug}")
        print(f"# {'op':<15}{'size':>10}{'count':>10}{'type':>9}  {'impl':<18}{'time(us)':>10}"
              f"{'algbw(GB/s)':>13}{'busbw(GB/s)':>13}{'wire/rank':>11}")
    records: list[dict] = []
    for op in ops:
        for nbytes in sizes:
            b = Buffers(op, nbytes, dtype, p)
            iters = iterations(b.nbytes, args.budget_mb, args.min_iters, args.max_iters)
            calls: dict[str, Callable[[], None]] = {}
            for impl in impls:
                if impl == "mpi4py":
                    calls[impl] = raw_call(op, b)
                elif impl == "gloo":
                    calls[impl] = torch_call(op, b, gloo_pg)
                else:
                    calls[impl] = torch_call(op, b, commrt_pg)
            best = {impl: float("inf") for impl in impls}
            best_cpu = {impl: float("inf") for impl in impls}
            wire = {}
            for impl, fn in calls.items():  # warm-up (and gloo support check) per impl
                try:
                    before = T.wire.bytes()
                    for _ in range(3):
                        fn()
                    wire[impl] = (T.wire.bytes() - before) // 3
                except (RuntimeError, ValueError) as exc:  # e.g. an op gloo lacks
                    best[impl] = float("nan")
                    if rank == 0:
                        print(f"# {impl} {op}: not supported ({str(exc).splitlines()[0]})")
            for _ in range(args.repeats):  # interleaved, so load changes hit every impl alike
                for impl, fn in calls.items():
                    if best[impl] != best[impl]:  # NaN: unsupported
                        continue
                    wall, cpu = timed(fn, iters, mpi_comm)
                    best[impl] = min(best[impl], wall)
                    best_cpu[impl] = min(best_cpu[impl], cpu)
            for impl in impls:
                t = best[impl]
                if t != t:
                    continue
                counted = impl.startswith("commrt")
                rec = dict(op=op, torch_op=OPS[op], impl=impl, bytes=b.nbytes, count=b.count,
                           dtype=args.dtype, time_us=t * 1e6, algbw_gbps=b.nbytes / t / 1e9,
                           busbw_gbps=b.nbytes / t / 1e9 * bus_factor(op, p), world_size=p,
                           wire_bytes=int(wire[impl]) if counted else
                           formula_wire_bytes(op, b.nbytes, p),
                           wire_source="counter" if counted else "formula", iters=iters,
                           cpu_us=best_cpu[impl] * 1e6)
                records.append(rec)
                if rank == 0:
                    print(f"  {op:<15}{b.nbytes:>10}{b.count:>10}{args.dtype:>9}  {impl:<18}"
                          f"{rec['time_us']:>10.1f}{rec['algbw_gbps']:>13.3f}"
                          f"{rec['busbw_gbps']:>13.3f}{rec['wire_bytes']:>11}{rec['cpu_us']:>10.1f}",
                          flush=True)

    if rank == 0:
        for line in summary(records):
            print("# " + line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    if gloo_pg is not None:
        dist.destroy_process_group(gloo_pg)
    dist.destroy_process_group()
    return records


def summary(records: list[dict]) -> list[str]:
    """The issue's two targets, from this run's records."""
    lines = []
    by = {(r["op"], r["impl"], r["bytes"]): r for r in records}
    for impl in ("commrt",):
        big = [(by[("allreduce", "mpi4py", n)], r) for (op, i, n), r in by.items()
               if op == "allreduce" and i == impl and n >= 1 << 20
               and ("allreduce", "mpi4py", n) in by]
        if big:
            ratios = ", ".join(f"{raw['bytes'] >> 10} KiB {raw['time_us'] / r['time_us']:.2f}x"
                               for raw, r in sorted(big, key=lambda x: x[0]["bytes"]))
            lines.append(f"all_reduce throughput {impl}/mpi4py at >= 1 MiB (target >= 0.9): "
                         f"{ratios}")
        small = [(by[(op, "mpi4py", n)], r) for (op, i, n), r in by.items()
                 if i == impl and n <= 4096 and (op, "mpi4py", n) in by]
        if small:
            for field, what in (("time_us", "wall"), ("cpu_us", "CPU")):
                over = [r[field] - raw[field] for raw, r in small]
                lines.append(f"{impl} per-call overhead over mpi4py at <= 4 KiB, {what} time "
                             f"(target <= 30 us): median {sorted(over)[len(over) // 2]:.1f} us, "
                             f"max {max(over):.1f} us over {len(over)} points")
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
