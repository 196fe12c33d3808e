"""The `commrt` torch.distributed backend against raw mpi4py, on the same buffers, in one run.

    python -m perf.bench.backend                          # 2 and 4 ranks, shm, 9 rounds
    python -m perf.bench.backend --ranks 2 --rounds 15 --out backend.md
    python -m perf.bench.backend --layers                 # also the layers in between (see below)
    python -m perf.bench.backend --launchers mpirun,torchrun --jobs 3   # the launchers compared
    python -m perf.bench.backend --device cuda --ranks 2  # CUDA tensors (the GPU rows)

The driver launches one ``mpirun`` job per world size in ``--ranks`` (perf.infra.launch's
launcher, shm) with ``--worker``; the perf suite (``python -m perf run collectives``)
runs the worker directly. Per op and size, every rank holds one set of torch tensors;
raw mpi4py works on numpy views of exactly those tensors, the backend on the tensors:

  op              raw mpi4py (blocking)            backend (blocking, default group)
  all_reduce      Allreduce(IN_PLACE, SUM)          dist.all_reduce
  all_gather      Allgather                         dist.all_gather_into_tensor
  reduce_scatter  Reduce_scatter_block(SUM)         dist.reduce_scatter_tensor
  broadcast       Bcast(root 0)                     dist.broadcast

float32, sizes are the whole array (all_gather: the output, reduce_scatter: the input).
Each round times a loop of `iters` calls of raw mpi4py, then a loop of the backend (then,
with ``--layers``, mpi4py's non-blocking call + Wait, the commrt transport's request +
wait, i.e. the backend minus torch.distributed and the process group, the transport as the
backend uses it (with the agreement check and the wait the watchdog can end), the floor: the
same torch.distributed call on a Python ProcessGroup that only posts mpi4py's non-blocking
call and returns a Work that waits on it, no checks, no timeouts, what any backend written
in Python pays; and the floor plus the agreement check and a wait the watchdog could end,
what a Python backend meeting the issue's mismatch and timeout requirements pays at the
least: `floor_group`; and that after a fixed per-call spin of SPIN_US, which shows what a
per-call cost of commrt's size costs beside a large transfer; and the raw call followed
by a commrt all_reduce of 1 KiB on a one-rank group ("raw + solo"), which runs commrt's
whole Python path (torch.distributed's call, the checks, the Work and its wait) and no
MPI: its overhead over raw is what that Python path costs right after a transfer of the
row's size, beside "solo" alone, its cost in a tight loop with warm caches), each loop
started by a barrier and timed as its slowest rank;
``--rounds`` rounds alternate A B, B A, A B, ... so load changes on a shared machine hit
both alike and neither always runs first. Reported: the medians over rounds of each
loop's per-call time, the per-call overhead = median over rounds of
(backend - raw), the throughput ratio = median over rounds of raw/backend, and the CPU
time per call of the calling thread (slowest rank; less sensitive to other jobs' load
than wall time). The issue's targets (2 ranks, shm): overhead <= 10 us at <= 4 KiB and
ratio >= 0.95 at >= 1 MiB; the `target` column says ok / MISS there (no target at other
world sizes).

``--device cuda`` puts the tensors on the GPU (rank r on GPU r mod the GPU count). Raw
mpi4py is then what a user writes by hand: the device buffers handed to a CUDA-aware MPI,
else copy to page-locked host buffers, the blocking call, copy back (`cuda_raw_call`,
the path commrt takes too; COMMRT_CUDA_AWARE=0 forces staging on both). Every call, raw
and commrt, ends with a device synchronize, so a time is until the result is usable.

``--launchers mpirun,torchrun`` runs every job under each launcher in turn (under
torchrun commrt forms MPI's world itself, through its PMI server), ``--jobs K`` K times
(A B A B ...); a first table then compares, per op and size, the medians over jobs of
raw MPI and commrt under each launcher.

Output: a markdown table per world size (per job) with machine info (cores, load average before
and after each job, ranks per core, MPI library, the environment variables that change
the result: COMMRT_*, MPIR_CVAR_*, TORCH_DISTRIBUTED_DEBUG), printed and written to
``--out`` (default ``results/<date>-<host>/backend.md``); ``--json`` writes the
records (op, impl, bytes, time_us, cpu_us, world_size; the backend's records also carry
overhead_us and ratio). Timings from a loaded machine say little: the table shows the
load average beside every job.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commrt.transports.rendezvous import MPI_LAUNCHER_ENV
from perf.infra.launch import REPO_ROOT, dated_results_dir, job_env, launch_mpi
from perf.infra.units import comma_list, parse_sizes
from perf.infra.workers import (
    add_driver_arguments,
    dispatch,
    run_worker_job,
    write_json,
)

MODULE = "perf.bench.backend"
OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast")
DEFAULT_SIZES = "1k,4k,64k,1m,4m"
SMALL_BYTES = 4 << 10       # the per-call overhead target applies at and below this size
LARGE_BYTES = 1 << 20       # the throughput target applies at and above this size
TARGET_OVERHEAD_US = 10.0
TARGET_RATIO = 0.95
TARGET_WORLD_SIZE = 2
# The floor + check's extra layer spins this long per call: about what commrt's Python
# costs beyond the floor + check at <= 4 KiB (so its large-message rows show what that much
# per-call work costs beside a large transfer).
SPIN_US = 7.0
# "solo" (commrt's Python path alone) runs at least this many calls per loop, so that the
# first call, cold after the loops of large transfers before it, does not set its time.
SOLO_ITERS = 200
ENV_PREFIXES = ("COMMRT_", "MPIR_CVAR_", "TORCH_DISTRIBUTED_DEBUG", "OMP_NUM_THREADS")


# --------------------------------------------------------------------------------------
# worker: runs on every rank of one MPI job


def _layer_calls(op: str, b: Any) -> dict[str, Callable[[], None]]:
    """On the same buffers, the steps between raw blocking MPI and the backend: mpi4py's
    non-blocking call + Wait; the commrt transport's request + wait; and the transport as
    the backend uses it ("transport+check"): the agreement check on the request (a fixed
    signature of the op) and the wait the watchdog could end (`Wakeup`)."""
    from mpi4py import MPI

    from commrt import transports as T
    from commrt.transports.agreement import encode_signature

    comm, world = MPI.COMM_WORLD, T.world()
    inp, out = b.inp.numpy(), b.out.numpy()
    check = encode_signature((op, b.count)).tobytes()

    def checked(post: Callable[..., Any]) -> Callable[[], None]:
        return lambda: post(check=check).wait_or_wake(T.Wakeup.of_thread())

    if op == "allreduce":
        return {"mpi4py-nb": lambda: comm.Iallreduce(MPI.IN_PLACE, out, op=MPI.SUM).Wait(),
                "transport": lambda: world.iallreduce(b.out).wait(),
                "transport+check": checked(lambda **kw: world.iallreduce(b.out, **kw))}
    if op == "allgather":
        return {"mpi4py-nb": lambda: comm.Iallgather(inp, out).Wait(),
                "transport": lambda: world.iallgather(b.inp, b.out).wait(),
                "transport+check": checked(lambda **kw: world.iallgather(b.inp, b.out, **kw))}
    if op == "reduce_scatter":
        return {"mpi4py-nb": lambda: comm.Ireduce_scatter_block(inp, out, op=MPI.SUM).Wait(),
                "transport": lambda: world.ireduce_scatter(b.inp, b.out).wait(),
                "transport+check": checked(
                    lambda **kw: world.ireduce_scatter(b.inp, b.out, **kw))}
    return {"mpi4py-nb": lambda: comm.Ibcast(out, root=0).Wait(),
            "transport": lambda: world.ibroadcast(b.out, 0).wait(),
            "transport+check": checked(lambda **kw: world.ibroadcast(b.out, 0, **kw))}


def _after_spin(call: Callable[[], None], us: float) -> Callable[[], None]:
    """`call` after `us` microseconds of pure CPU work (a clock-reading loop, no memory
    traffic): what a fixed per-call cost of that size costs beside the collective."""
    def spun() -> None:
        end = time.perf_counter() + us * 1e-6
        while time.perf_counter() < end:
            pass
        call()
    return spun


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()
    return both


def floor_group(checked: bool = False) -> Any:
    """A torch.distributed group on the floor backend (see the module docstring): each op
    is one mpi4py non-blocking call on the caller's buffers, float32 SUM only; its Work
    waits on that request and nothing else.

    `checked`: the floor plus what the issue asks of every call and nothing else: the
    cross-rank agreement check (the op's signature, encoded once per signature, in one of
    the transport's persistent MAX-allreduce slots started just before the data) and a
    wait the timeout watchdog could end (the transport's Wakeup: MPI_Waitany with a
    wake-up receive), the check examined first. No wire counts, background progress,
    sequence numbers, coalescing, future ordering or dtype/reduction tables."""
    import torch.distributed as dist
    from mpi4py import MPI

    from commrt.transports.agreement import encode_signature
    from commrt.transports.request import CheckSlots
    from commrt.transports.wakeup import Wakeup

    class FloorWork(dist._Work):
        __slots__ = ("request",)

        def __init__(self, request: Any) -> None:
            super().__init__()
            self.request = request

        def wait(self, timeout: Any = None) -> bool:
            self.request.Wait()
            return True

    class CheckedWork(dist._Work):
        __slots__ = ("request", "check")

        def __init__(self, request: Any, check: tuple) -> None:
            super().__init__()
            self.request, self.check = request, check

        def wait(self, timeout: Any = None) -> bool:
            wakeup = Wakeup.of_thread()
            check_request, result, sent, _ = self.check
            if not wakeup.wait(check_request):
                raise RuntimeError("woken")
            if result != sent:
                raise ValueError("the ranks disagree")
            if not wakeup.wait(self.request):
                raise RuntimeError("woken")
            return True

    def buf(t: Any) -> list:
        # No count: mpi4py derives it, per rank for the gathered and scattered side.
        return [MPI.buffer.fromaddress(t.data_ptr(), 4 * t.numel()), MPI.FLOAT]

    class FloorGroup(dist.ProcessGroup):
        def __init__(self, rank: int, size: int) -> None:
            super().__init__(rank, size)
            self.comm = MPI.COMM_WORLD.Dup()
            self.slots = CheckSlots(self.comm) if checked else None
            self.encoded: dict[tuple, bytes] = {}

        def getBackendName(self) -> str:
            return "floor"

        def _work(self, signature: tuple, post: Callable[[], Any]) -> Any:
            if self.slots is None:
                return FloorWork(post())
            sent = self.encoded.get(signature)
            if sent is None:
                sent = self.encoded[signature] = encode_signature(signature).tobytes()
            check = self.slots.start(sent)
            return CheckedWork(post(), check)

        def allreduce(self, tensors: list, opts: Any = None) -> Any:
            t = tensors[0]
            return self._work(("all_reduce", t.numel(), t.dtype), lambda: self.comm.Iallreduce(
                MPI.IN_PLACE, buf(t), MPI.SUM))

        def all_gather_single(self, out: Any, inp: Any, opts: Any = None) -> Any:
            return self._work(("all_gather", inp.numel(), inp.dtype),
                              lambda: self.comm.Iallgather(buf(inp), buf(out)))

        def reduce_scatter_single(self, out: Any, inp: Any, opts: Any = None) -> Any:
            return self._work(("reduce_scatter", out.numel(), out.dtype),
                              lambda: self.comm.Ireduce_scatter_block(buf(inp), buf(out),
                                                                      MPI.SUM))

        def broadcast(self, tensors: list, opts: Any = None) -> Any:
            t, root = tensors[0], opts.rootRank
            return self._work(("broadcast", t.numel(), t.dtype, root),
                              lambda: self.comm.Ibcast(buf(t), root=root))

    name = "floorcheck" if checked else "floor"
    if name not in dist.Backend.backend_list:
        dist.Backend.register_backend(name, lambda store, rank, size, timeout:
                                      FloorGroup(rank, size), devices=["cpu"])
    return dist.new_group(backend=name)


def check_floor(floor: Any, rank: int, p: int) -> None:
    """The floor group computes what the backend does (else its times would mean nothing):
    each op once on rank-dependent data, against the default (commrt) group."""
    import torch
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(6 * p, generator=gen)
    for name, run in (
            ("allreduce", lambda g, out: (out.copy_(x), dist.all_reduce(out, group=g))),
            ("allgather", lambda g, out: dist.all_gather_into_tensor(out, x, group=g)),
            ("reduce_scatter", lambda g, out: dist.reduce_scatter_tensor(out[:6], x, group=g)),
            ("broadcast", lambda g, out: (out.copy_(x), dist.broadcast(out, 0, group=g)))):
        size = 6 * p * p if name == "allgather" else 6 * p
        got, want = torch.zeros(size), torch.zeros(size)
        run(floor, got)
        run(None, want)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"the floor group's {name} differs from commrt's")


def cuda_raw_call(op: str, b: Any) -> Callable[[], None]:
    """Raw mpi4py on CUDA buffers, as a user would write it: the device buffers handed to
    MPI where the library is CUDA-aware (`commrt.transports.cuda_aware`, which
    COMMRT_CUDA_AWARE overrides for both sides), else staged through page-locked host
    copies: copy out, the blocking call, copy back."""
    from commrt.transports import cuda_aware
    from perf.bench.collectives import Buffers, raw_call

    if cuda_aware():
        return raw_call(op, b)
    host = Buffers(b.op, b.nbytes, b.dtype, b.p, pinned=True)
    on_host = raw_call(op, host)

    def staged() -> None:
        host.inp.copy_(b.inp)
        on_host()
        b.out.copy_(host.out)
    return staged


def run_worker(args: argparse.Namespace) -> list[dict]:
    """Time every (op, size) on this job's ranks; rank 0 returns (and writes) the records."""
    import torch
    import torch.distributed as dist

    import commrt  # noqa: F401  (registers the backend)
    from perf.bench.collectives import Buffers, iterations, raw_call, timed, torch_call

    torch.set_num_threads(1)
    # First: without mpirun (torchrun) this is what forms MPI's world.
    dist.init_process_group("commrt")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, p = comm.Get_rank(), comm.Get_size()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    records: list[dict] = []
    floors = {"floor": floor_group(), "floor+check": floor_group(checked=True)} \
        if args.layers else {}
    for floor in floors.values():
        check_floor(floor, rank, p)
    if args.layers:  # (collective: every rank makes the one-rank groups together)
        solo, _ = dist.new_subgroups(group_size=1)
        solo_tensor = torch.zeros(256)
    for op in args.ops:
        for nbytes in args.sizes:
            b = Buffers(op, nbytes, torch.float32, p, device=device)
            calls = {"mpi4py": raw_call(op, b), "commrt": torch_call(op, b, None)}
            if device.type == "cuda":  # a call's time is until its result is usable
                calls = {"mpi4py": _then(cuda_raw_call(op, b), torch.cuda.synchronize),
                         "commrt": _then(calls["commrt"], torch.cuda.synchronize)}
            if args.layers:
                calls.update(_layer_calls(op, b))
                calls.update({k: torch_call(op, b, g) for k, g in floors.items()})
                calls["floor+check+spin"] = _after_spin(calls["floor+check"], SPIN_US)
                calls["solo"] = lambda: dist.all_reduce(solo_tensor, group=solo)
                calls["mpi4py+solo"] = _then(calls["mpi4py"], calls["solo"])
            iters = iterations(b.nbytes, args.budget_mb, args.min_iters, args.max_iters)
            for fn in calls.values():  # warm-up: MPICH's shm collectives switch in after a few
                for _ in range(args.warmup):
                    fn()
            wall: dict[str, list[float]] = {k: [] for k in calls}
            cpu: dict[str, list[float]] = {k: [] for k in calls}
            order = list(calls.items())
            for k in range(args.rounds):
                # Every other round in reverse, so that no implementation always runs
                # first (right after the barrier) or right after a particular other one.
                for impl, fn in (order if k % 2 == 0 else order[::-1]):
                    w, c = timed(fn, max(iters, SOLO_ITERS) if impl == "solo" else iters, comm)
                    wall[impl].append(w)
                    cpu[impl].append(c)
            raw = wall["mpi4py"]
            for impl in calls:
                rec = dict(op=op, impl=impl, bytes=b.nbytes, count=b.count, dtype="float32",
                           device=device.type, world_size=p, iters=iters, rounds=args.rounds,
                           time_us=1e6 * statistics.median(wall[impl]),
                           cpu_us=1e6 * statistics.median(cpu[impl]))
                if impl != "mpi4py":
                    rec["overhead_us"] = 1e6 * statistics.median(
                        [x - r for x, r in zip(wall[impl], raw)])
                    rec["ratio"] = statistics.median([r / x for x, r in zip(wall[impl], raw)])
                records.append(rec)
            if rank == 0:
                rec = next(r for r in records[-len(calls):] if r["impl"] == "commrt")
                print(f"[perf.bench.backend] P={p} {op:<15}{b.nbytes:>9} B  raw "
                      f"{records[-len(calls)]['time_us']:9.1f} us  commrt {rec['time_us']:9.1f} us"
                      f"  +{rec['overhead_us']:.1f} us  {rec['ratio']:.2f}x", flush=True)
    dist.destroy_process_group()
    if rank == 0 and args.json:
        # The perf suite reads "records"; the driver also reports what the ranks ran with.
        Path(args.json).write_text(json.dumps(dict(
            records=records, mpi=MPI.Get_library_version().splitlines()[0].strip(),
            device=device_label(device),
            throttle=os.environ.get("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "unset")), indent=1))
    return records


# --------------------------------------------------------------------------------------
# driver: one MPI job per world size, then the table


def fmt_size(n: int) -> str:
    for suffix, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {suffix}"
    return f"{n} B"


def target_verdict(rec: dict) -> str:
    """'ok' / 'MISS' against the issue's targets, '' where none applies."""
    if rec["world_size"] != TARGET_WORLD_SIZE:
        return ""
    if rec["bytes"] <= SMALL_BYTES:
        return "ok" if rec["overhead_us"] <= TARGET_OVERHEAD_US else "MISS"
    if rec["bytes"] >= LARGE_BYTES:
        return "ok" if rec["ratio"] >= TARGET_RATIO else "MISS"
    return ""


def markdown_table(records: list[dict]) -> str:
    """One table of a world size's records (all of one job)."""
    by = {(r["op"], r["bytes"], r["impl"]): r for r in records}
    layers = any(r["impl"] == "transport" for r in records)
    head = ["op", "size", "raw mpi4py (us)", "commrt (us)", "overhead (us)", "ratio",
            "CPU raw (us)", "CPU commrt (us)"]
    if layers:
        head[4:4] = ["mpi4py I*+Wait (us)", "transport (us)", "transport + check (us)",
                     "Python PG floor (us)", "floor overhead (us)",
                     "floor + check overhead (us)",
                     f"floor + check + {SPIN_US:g} us spin overhead (us)",
                     "commrt on one rank, warm (us)", "the same after the transfer (us)"]
    head.append("target")
    rows = []
    for (op, nbytes, impl), rec in by.items():
        if impl != "commrt":
            continue
        raw = by[(op, nbytes, "mpi4py")]
        row = [op, fmt_size(nbytes), f"{raw['time_us']:.1f}", f"{rec['time_us']:.1f}",
               f"{rec['overhead_us']:+.1f}", f"{rec['ratio']:.2f}", f"{raw['cpu_us']:.1f}",
               f"{rec['cpu_us']:.1f}", target_verdict(rec)]
        if layers:
            row[4:4] = [f"{by[(op, nbytes, k)]['time_us']:.1f}"
                        for k in ("mpi4py-nb", "transport", "transport+check", "floor")]
            row[8:8] = [f"{by[(op, nbytes, k)]['overhead_us']:+.1f}"
                        for k in ("floor", "floor+check", "floor+check+spin")] + [
                f"{by[(op, nbytes, 'solo')]['time_us']:.1f}",
                f"{by[(op, nbytes, 'mpi4py+solo')]['overhead_us']:+.1f}"]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    return dict(host=socket.gethostname(), cores=cores, load_avg=list(os.getloadavg()),
                python=sys.version.split()[0],
                env={k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)})


def launch(args: argparse.Namespace, nprocs: int, worker_args: list[str],
           via: str = "mpirun") -> subprocess.CompletedProcess:
    """One worker job: perf.infra.launch's mpirun over shm, `--launcher` (its argv, then
    ``-n N python -m perf.bench.backend ...``), or torchrun (`via`), with the same environment."""
    if via == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nprocs}", "-m", MODULE, *worker_args]
        env = {k: v for k, v in job_env(nprocs).items() if k not in MPI_LAUNCHER_ENV}
        return subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    if not args.launcher:
        return launch_mpi(nprocs, MODULE, worker_args, timeout=args.timeout, check=False)
    cmd = [*shlex.split(args.launcher), "-n", str(nprocs), sys.executable, "-m", MODULE,
           *worker_args]
    return subprocess.run(cmd, cwd=str(REPO_ROOT), env=job_env(nprocs), capture_output=True,
                          text=True, timeout=args.timeout)


def launcher_table(jobs: list[tuple[str, list[dict]]]) -> str:
    """Per op and size, the medians over jobs of raw MPI and of commrt under each launcher
    (jobs alternate launchers, so load changes hit both alike)."""
    by: dict[tuple, list[dict]] = {}
    for via, records in jobs:
        for r in records:
            by.setdefault((r["op"], r["bytes"], r["impl"], via), []).append(r)
    vias = list(dict.fromkeys(via for via, _ in jobs))
    head = ["op", "size"] + [f"{col} ({via})" for via in vias
                             for col in ("raw us", "commrt us", "overhead us")]
    rows = []
    for op, nbytes in dict.fromkeys((r["op"], r["bytes"]) for _, rs in jobs for r in rs):
        row = [op, fmt_size(nbytes)]
        for via in vias:
            raw = by.get((op, nbytes, "mpi4py", via), [])
            ours = by.get((op, nbytes, "commrt", via), [])
            med = lambda rs, key: statistics.median(r[key] for r in rs) if rs else float("nan")  # noqa: E731
            row += [f"{med(raw, 'time_us'):.1f}", f"{med(ours, 'time_us'):.1f}",
                    f"{med(ours, 'overhead_us'):+.1f}"]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def device_label(device: Any) -> str:
    """The tensors' device for the table: "cpu tensors", or the GPU's name and MPI's path
    to it."""
    if device.type != "cuda":
        return "cpu tensors"
    import torch

    from commrt.transports import cuda_aware
    path = "CUDA-aware MPI" if cuda_aware() else "staged through page-locked host buffers"
    return f"CUDA tensors on {torch.cuda.get_device_name(device)}, {path}"


def run_driver(args: argparse.Namespace) -> int:
    machine = machine_info()
    sections: list[str] = []
    all_records: list[dict] = []
    failed: list[str] = []
    mpi_libs: set[str] = set()
    devices: set[str] = set()
    by_launcher: dict[int, list[tuple[str, list[dict]]]] = {}
    worker_args = ["--ops", ",".join(args.ops), "--sizes", ",".join(map(str, args.sizes)),
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup),
                   "--budget-mb", str(args.budget_mb), "--min-iters", str(args.min_iters),
                   "--max-iters", str(args.max_iters), "--device", args.device] + \
        (["--layers"] if args.layers else [])
    for nprocs, job_index, via in [(n, j, via) for n in args.ranks for j in range(args.jobs)
                                   for via in args.launchers]:
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        what = f"{nprocs} ranks" + (f", {via}" if len(args.launchers) > 1 else "") + \
            (f", job {job_index + 1}" if args.jobs > 1 else "")
        job = run_worker_job(lambda argv, n=nprocs, via=via: launch(args, n, argv, via),
                             worker_args, what, failed)
        if job is None:
            continue
        records = job["records"]
        for r in records:
            r["launcher"] = via
        all_records += records
        by_launcher.setdefault(nprocs, []).append((via, records))
        mpi_libs.add(job["mpi"])
        devices.add(job["device"])
        sections.append(
            f"## {what} ({nprocs / machine['cores']:.1f} ranks per core)\n\n"
            f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"{time.perf_counter() - started:.0f} s; "
            f"MPIR_CVAR_CH4_PROGRESS_THROTTLE={job['throttle']}"
            f"\n\n{markdown_table(records)}\n")
    env = ", ".join(f"{k}={v}" for k, v in machine["env"].items()) or "none set"
    header = (
        f"# commrt backend vs raw mpi4py\n\n"
        f"{_dt.datetime.now().isoformat(timespec='seconds')}, host {machine['host']}: "
        f"{machine['cores']} cores, load average {machine['load_avg'][0]:.2f} / "
        f"{machine['load_avg'][1]:.2f} / {machine['load_avg'][2]:.2f} (1/5/15 min) at start; "
        f"{', '.join(sorted(mpi_libs)) or 'MPI library unknown'}; Python {machine['python']}; "
        f"environment: {env}.\n\n"
        f"float32, {'; '.join(sorted(devices)) or args.device + ' tensors'}, shm, blocking calls "
        f"on the same buffers"
        + (" (each call followed by a device synchronize; raw mpi4py as a user would call "
           "it, see cuda_raw_call)" if args.device == "cuda" else "")
        + f"; {args.rounds} rounds alternating "
        f"raw / commrt{' / the layers' if args.layers else ''}; times are medians over rounds "
        f"of a loop's per-call time (slowest rank); overhead = median of (commrt - raw), "
        f"ratio = median of raw/commrt (throughput). Targets at {TARGET_WORLD_SIZE} ranks: "
        f"overhead <= {TARGET_OVERHEAD_US:g} us at <= {fmt_size(SMALL_BYTES)}, ratio >= "
        f"{TARGET_RATIO} at >= {fmt_size(LARGE_BYTES)}.\n"
        + (f"\nnot run: {'; '.join(failed)}\n" if failed else ""))
    if len(args.launchers) > 1 or args.jobs > 1:
        sections.insert(0, "".join(
            f"## {n} ranks: launchers compared (medians over {args.jobs} job(s) each, jobs "
            f"alternating {' / '.join(args.launchers)})\n\n{launcher_table(jobs)}\n\n"
            for n, jobs in by_launcher.items()))
    text = header + "\n" + "\n".join(sections)
    print(text)
    out = Path(args.out) if args.out else dated_results_dir() / "backend.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[perf.bench.backend] wrote {out}")
    write_json(args.json, all_records)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.bench.backend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="world sizes, one MPI job each (2,4)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="whole-array sizes (1k,4k,64k,1m,4m)")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds (medians over them)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per implementation")
    p.add_argument("--budget-mb", type=float, default=8.0,
                   help="bytes per timed loop (sets the iterations per loop)")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=400)
    p.add_argument("--layers", action="store_true",
                   help="also time mpi4py's non-blocking call + Wait and the commrt transport")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the tensors live (cuda: rank r on GPU r mod the GPU count)")
    p.add_argument("--launcher", default=None,
                   help="launcher argv instead of perf.infra.launch's mpirun, e.g. "
                        "'mpirun -bind-to core'"
                        " (the driver appends -n N python -m perf.bench.backend ...)")
    p.add_argument("--launchers", default="mpirun",
                   help="comma list of mpirun (perf.infra.launch's, or --launcher) and torchrun "
                        "(commrt forms MPI's world itself); with several, jobs alternate")
    p.add_argument("--jobs", type=int, default=1, help="jobs per world size and launcher")
    add_driver_arguments(p, timeout=1200.0, out=None,
                         out_help="markdown output path (default results/<date>-<host>/backend.md)")
    args = p.parse_args(argv)
    args.ranks = comma_list(args.ranks, int)
    args.ops = comma_list(args.ops)
    args.sizes = parse_sizes(args.sizes)
    args.launchers = comma_list(args.launchers)
    if not args.launchers or set(args.launchers) - {"mpirun", "torchrun"}:
        p.error(f"--launchers takes mpirun and/or torchrun, got {args.launchers}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {', '.join(OPS)}")
    if not args.ranks or min(args.ranks) < 2:
        p.error("--ranks needs world sizes >= 2 (one rank has nothing to compare)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cuda" and args.layers:
        p.error("--layers times CPU tensors only (the floor groups post host buffers)")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return dispatch(parse_args(argv), run_worker, run_driver)


if __name__ == "__main__":
    sys.exit(main())
