"""Benchmark of the sparse and quantized allreduce: time, wire bytes, speedup over dense.

Sweeps n (floats per rank), density, world size and algorithm — dense, spardl (1 team),
spardl2 (2 teams, B-SAG), topka, gtopk, quant8, quant1 — on plain shared memory and on an
emulated link (via perf.infra.netem: a network namespace whose loopback is
shaped by tc, always deleted afterwards), and writes under --out:

    sparse.json   one record per (link, world_size, n, density, algorithm):
                  time_ms (median over iterations of the slowest rank), wire_bytes
                  (per rank: mean over ranks, from commrt.transports.wire), messages,
                  speedup (dense time / time, same link, world size and n), and what the
                  time is made of:
                  compute_ms  median over iterations of the largest per-rank time spent
                              outside transport waits (local kernels, packing, Python;
                              the collectives' last["compute_s"]);
                  cpu_ms      median over iterations of the largest per-rank CPU time of
                              the calling thread (with more ranks than cores, compute_ms
                              also counts the time a rank waits for its core);
                  wait_ms     time_ms - compute_ms: waiting on the link and on ranks;
                  link_ms     the wire bytes alone on the shaped link: every rank's bytes
                              over the rate (the flat emulation's loopback is one shared
                              medium), None on shm; a lower bound for the link's part;
                  shm_ms      the same point's time_ms on shm (when shm ran too): the
                              algorithm without the link;
                  reuse_steps, reused (fraction of top-k sites that reused a threshold
                  during the timed iterations; None where nothing is selected)
    sparse.md     the table
    sparse.png    speedup over dense versus density, one panel per (link, world size, n)

Usage (the driver launches one MPI job per (link, world size) with --worker)::

    python -m perf.bench.sparse --sizes 1M,16M --densities 0.001,0.01,0.1 --world-sizes 4,8,16 \
        --links shm,1gbit --iters 3 --out results/sparse

Sizes accept K/M suffixes (powers of two: 1M = 2^20). Without root/ip/tc the shaped links
are reported as unavailable and skipped. ``--reuse N`` turns on threshold reuse (every
sparse algorithm keeps its top-k thresholds for up to N calls; 1, the default, is off);
since the benchmark feeds the same gradient every iteration with error feedback, the
candidate counts settle only after about 1/density calls, so pair it with a long
``--warmup`` (e.g. 100 at density 0.01) and check the ``reused`` column.

The gradient is float32 random normal per rank; every algorithm is timed on the same data
after --warmup calls (SparDL's adaptive h has settled by then); the cross-rank input check
runs only on the first call. The points of one n run interleaved: each iteration calls
every (algorithm, density) once, in reverse order every other iteration, so that a change
in the machine's speed hits them alike (each keeps its own residual: memory grows with the
number of points, n floats each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from commrt.training.metrics import pyplot
from perf.infra.units import comma_list, parse_sizes
from perf.infra.workers import (
    add_driver_arguments,
    dispatch,
    run_worker_job,
    write_json,
)

MODULE = "perf.bench.sparse"
ALGORITHMS = ("dense", "spardl", "spardl2", "topka", "gtopk", "quant8", "quant1")
DENSITY_FREE = ("dense", "quant8", "quant1")


def format_size(n: int) -> str:
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


# --------------------------------------------------------------------------------------
# worker: runs on every rank of one MPI job


def _make_reducer(algorithm: str, density: float, reuse: int):
    from commrt.collectives import QuantizedAllreduce, SparseAllreduce

    if algorithm.startswith("quant"):
        return QuantizedAllreduce(int(algorithm[5:]))
    if algorithm == "spardl2":
        return SparseAllreduce(density, "spardl", teams=2, reuse_steps=reuse)
    return SparseAllreduce(density, algorithm, reuse_steps=reuse)


class Point:
    """One (algorithm, density) of the sweep: its reducer, its residual, and per timed call
    the wall time, the time outside transport waits, the calling thread's CPU time, the
    wire bytes and messages, and how many top-k sites reused a threshold."""

    def __init__(self, algorithm: str, density: float | None, reducer: Any,
                 residual: Any) -> None:
        self.algorithm, self.density = algorithm, density
        self.reducer, self.residual = reducer, residual
        self.times: list[float] = []
        self.compute: list[float] = []
        self.cpu: list[float] = []
        self.wire: list[int] = []
        self.msgs: list[int] = []
        self.sites = self.reused = 0

    def call(self, comm: Any, grad: Any, *, first: bool, timed: bool) -> None:
        from commrt import transports as T

        tensor = grad.clone()
        comm.barrier()
        before = T.wire.snapshot()
        cpu_start = time.thread_time()
        start = time.perf_counter()
        self.reducer(tensor, self.residual, validate=first)
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu_start
        delta = T.snapshot_delta(T.wire.snapshot(), before)
        if not timed:
            return
        self.times.append(elapsed)
        self.compute.append(self.reducer.last["compute_s"])
        self.cpu.append(cpu)
        self.wire.append(sum(b for b, _ in delta.values()))
        self.msgs.append(sum(m for _, m in delta.values()))
        selection = self.reducer.last.get("selection", {}).values()
        self.sites += len(selection)
        self.reused += sum(site["reused"] for site in selection)

    def record(self, comm: Any, n: int, args: argparse.Namespace) -> dict[str, Any]:
        """The point's record (collective over `comm`): per iteration the slowest rank's
        time, compute and CPU; medians over iterations."""
        def slowest(values: list[float]) -> list[float]:
            every = comm.allgather_object(values)
            return [max(vs[i] for vs in every) for i in range(len(values))]
        counts = comm.allgather_object((self.sites, self.reused))
        sites_all = sum(c[0] for c in counts)
        wire_all = comm.allgather_object(statistics.mean(self.wire))
        return {
            "world_size": comm.size, "n": n, "algorithm": self.algorithm,
            "density": self.density,
            "time_ms": 1e3 * statistics.median(slowest(self.times)),
            "compute_ms": 1e3 * statistics.median(slowest(self.compute)),
            "cpu_ms": 1e3 * statistics.median(slowest(self.cpu)),
            "reuse_steps": args.reuse,
            "reused": (sum(c[1] for c in counts) / sites_all) if sites_all else None,
            "wire_bytes": statistics.mean(wire_all),
            "wire_bytes_max": max(wire_all),
            "messages_max": max(comm.allgather_object(max(self.msgs))),
            "iters": args.iters,
        }


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from commrt import transports as T

    torch.set_num_threads(1)
    comm = T.world()
    P = comm.size
    records: list[dict[str, Any]] = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(comm.rank)
        grad = torch.randn(n, generator=g)
        # Every (algorithm, density) point of this n, each with its reducer and residual;
        # timed interleaved, one call of each per iteration (the order reversed every other
        # iteration), so that the machine's phases hit them alike.
        points = [Point(algorithm, density, _make_reducer(algorithm, density or 1.0, args.reuse),
                        torch.zeros(n))
                  for algorithm in args.algorithms
                  if not (algorithm == "spardl2" and (P % 2 or P < 4))
                  for density in ([None] if algorithm in DENSITY_FREE else args.densities)]
        for it in range(args.warmup + args.iters):
            for point in (points if it % 2 == 0 else points[::-1]):
                point.call(comm, grad, first=it == 0, timed=it >= args.warmup)
        for point in points:
            records.append(point.record(comm, n, args))
            if comm.rank == 0:
                r = records[-1]
                print(f"P={P} n={format_size(n)} {point.algorithm} density={point.density} "
                      f"{r['time_ms']:.1f} ms (compute {r['compute_ms']:.1f} ms, CPU "
                      f"{r['cpu_ms']:.1f} ms) {r['wire_bytes'] / 1e6:.3f} MB", flush=True)
        del points
    if comm.rank == 0:
        Path(args.json).write_text(json.dumps(records))


# --------------------------------------------------------------------------------------
# driver


def add_breakdown(records: list[dict[str, Any]]) -> None:
    """wait_ms, link_ms and shm_ms of every record (see the module docstring)."""
    from perf.infra.netem import link_rate_bps

    shm = {(r["world_size"], r["n"], r["algorithm"], r["density"]): r["time_ms"]
           for r in records if r["link"] == "shm"}
    for r in records:
        r["wait_ms"] = r["time_ms"] - r["compute_ms"]
        rate = link_rate_bps(r["link"])
        r["link_ms"] = (1e3 * 8 * r["world_size"] * r["wire_bytes"] / rate) if rate else None
        r["shm_ms"] = shm.get((r["world_size"], r["n"], r["algorithm"], r["density"]))


def add_speedups(records: list[dict[str, Any]]) -> None:
    dense = {(r["link"], r["world_size"], r["n"]): r["time_ms"]
             for r in records if r["algorithm"] == "dense"}
    dense_bytes = {(r["link"], r["world_size"], r["n"]): r["wire_bytes"]
                   for r in records if r["algorithm"] == "dense"}
    for r in records:
        key = (r["link"], r["world_size"], r["n"])
        r["speedup"] = dense[key] / r["time_ms"] if key in dense and r["time_ms"] > 0 else None
        r["byte_ratio"] = (dense_bytes[key] / r["wire_bytes"]
                           if key in dense_bytes and r["wire_bytes"] else None)


def markdown(records: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| link | P | n | algorithm | density | time (ms) | compute (ms) | CPU (ms) | "
             "wait (ms) | "
             "link bytes (ms) | shm (ms) | reused | wire MB/rank | messages | "
             "speedup vs dense | bytes vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {a: i for i, a in enumerate(ALGORITHMS)}
    for r in sorted(records, key=lambda r: (r["link"], r["world_size"], r["n"],
                                            order[r["algorithm"]], r["density"] or 0)):
        sp = f"{r['speedup']:.2f}×" if r.get("speedup") else "-"
        br = f"{r['byte_ratio']:.1f}×" if r.get("byte_ratio") else "-"
        dens = f"{100 * r['density']:g}%" if r["density"] else "-"
        link = f"{r['link_ms']:.1f}" if r.get("link_ms") is not None else "-"
        shm = f"{r['shm_ms']:.1f}" if r.get("shm_ms") is not None else "-"
        reused = f"{100 * r['reused']:.0f}%" if r.get("reused") is not None else "-"
        lines.append(f"| {r['link']} | {r['world_size']} | {format_size(r['n'])} | "
                     f"{r['algorithm']} | {dens} | {r['time_ms']:.1f} | "
                     f"{r['compute_ms']:.1f} | {r['cpu_ms']:.1f} | {r['wait_ms']:.1f} | "
                     f"{link} | {shm} | "
                     f"{reused} | {r['wire_bytes'] / 1e6:.3f} | {r['messages_max']} | "
                     f"{sp} | {br} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot(required=False)
    if plt is None:
        return False
    panels = sorted({(r["link"], r["world_size"], r["n"]) for r in records})
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (link, P, n) in zip(axes.flat, panels):
        mine = [r for r in records if (r["link"], r["world_size"], r["n"]) == (link, P, n)]
        densities = sorted({r["density"] for r in mine if r["density"]})
        for algorithm in ALGORITHMS:
            pts = sorted((r["density"], r["speedup"]) for r in mine
                         if r["algorithm"] == algorithm and r.get("speedup") and r["density"])
            if pts:
                ax.plot([100 * d for d, _ in pts], [s for _, s in pts], marker="o",
                        label=algorithm)
            elif algorithm != "dense" and densities:
                flat = [r["speedup"] for r in mine if r["algorithm"] == algorithm
                        and r.get("speedup")]
                if flat:
                    ax.plot([100 * densities[0], 100 * densities[-1]], [flat[0]] * 2,
                            linestyle="--", label=algorithm)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (%)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{link}, P={P}, n={format_size(n)}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_driver(args: argparse.Namespace) -> int:
    from perf.infra.launch import launch_mpi
    from perf.infra.netem import LinkUnavailable

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    worker_args = ["--reuse", str(args.reuse), "--sizes", ",".join(map(str, args.sizes)),
                   "--densities", ",".join(map(str, args.densities)),
                   "--algorithms", ",".join(args.algorithms),
                   "--iters", str(args.iters), "--warmup", str(args.warmup)]
    for link in args.links:
        for P in args.world_sizes:
            started = time.perf_counter()
            try:
                job = run_worker_job(
                    lambda argv, P=P, link=link: launch_mpi(P, MODULE, argv, link=link,
                                                            timeout=args.timeout, check=False),
                    worker_args, f"{link} P={P}", skipped)
            except LinkUnavailable as exc:
                skipped.append(f"{link}: unavailable ({exc})")
                print(f"[perf.bench.sparse] link {link} unavailable: {exc}", file=sys.stderr)
                break
            if job is None:
                continue
            for r in job:
                r["link"] = link
                records.append(r)
            print(f"[perf.bench.sparse] {link} P={P}: {time.perf_counter() - started:.0f} s",
                  flush=True)
    add_speedups(records)
    add_breakdown(records)
    header = (f"# Sparse allreduce benchmark\n\nhost: {os.uname().nodename}, "
              f"{os.cpu_count()} CPUs, no GPU (CPU tensors); iterations {args.iters} "
              f"after {args.warmup} warm-up; time = median over iterations of the slowest "
              f"rank; wire bytes per rank from commrt.transports.wire; compute = the "
              f"slowest rank's time outside transport waits, wait = time - compute, link "
              f"bytes = all ranks' wire bytes over the shared link rate (the bytes' own "
              f"time), shm = the same point on shm; threshold reuse "
              f"{'every ' + str(args.reuse) + ' calls' if args.reuse > 1 else 'off'}."
              + (f"\n\nnot run: {'; '.join(skipped)}" if skipped else ""))
    write_json(out / "sparse.json", records)
    (out / "sparse.md").write_text(markdown(records, header))
    plotted = plot(records, out / "sparse.png")
    print(markdown(records, header))
    print(f"[perf.bench.sparse] wrote {out}/sparse.json, sparse.md"
          + (", sparse.png" if plotted else " (no plot: matplotlib missing)"))
    write_json(args.json, records)
    return 0 if records else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from perf.infra.launch import RESULTS_DIR

    p = argparse.ArgumentParser(prog="python -m perf.bench.sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M", help="floats per rank, comma separated (1M,16M)")
    p.add_argument("--densities", default="0.001,0.01,0.1")
    p.add_argument("--world-sizes", default="4", help="comma separated, e.g. 4,8,16")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"subset of {','.join(ALGORITHMS)}")
    p.add_argument("--links", default="shm,1gbit", help="shm and/or shaped rates (1gbit...)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reuse", type=int, default=1,
                   help="threshold reuse: the sparse algorithms keep each top-k threshold "
                        "for up to this many calls (1: off); pair with --warmup >= 1/density")
    add_driver_arguments(p, timeout=600.0, out=str(RESULTS_DIR / "sparse"),
                         out_help="folder of sparse.json, sparse.md and sparse.png")
    args = p.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    args.densities = comma_list(args.densities, float)
    args.world_sizes = comma_list(args.world_sizes, int)
    args.algorithms = comma_list(args.algorithms)
    args.links = comma_list(args.links)
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad:
        p.error(f"unknown algorithms {bad}; choose from {ALGORITHMS}")
    if any(not 0 < d <= 1 for d in args.densities):
        p.error("densities must lie in (0, 1]")
    if args.reuse < 1:
        p.error("--reuse must be >= 1 (1: no threshold reuse)")
    return args


def main(argv: list[str] | None = None) -> int:
    return dispatch(parse_args(argv), run_worker, run_driver)


if __name__ == "__main__":
    sys.exit(main())
