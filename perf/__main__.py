"""The perf suite's command line: ``python -m perf run SUITE`` (from the repository root).

Suites (each launches its own ``mpirun`` jobs, over every requested link):

  quick        < 5 min on 2 cores: raw-MPI α–β sweep (2–4 ranks), allreduce of raw mpi4py /
               commrt / gloo and SparDL vs dense on 4 ranks, a small kernel run; headline
               numbers (commrt/raw-MPI throughput, SparDL speedup at 1 Gbit/s), model check.
  collectives  nccl-tests sweeps of every dense collective, raw mpi4py / commrt / gloo,
               world sizes 2..4 (non powers of two included); the backend against raw
               mpi4py on the same buffers, rounds alternated (perf/backend.py, shm).
  sparse       every sparse / quantized algorithm against dense.
  kernels      the compression kernels, single process.
  train        every method of ``python -m commrt.train`` on one link: time-to-target-loss,
               loss vs wall clock, exposed communication (perf/train_bench.py).
  all          all of the above.

Options: ``--link shm,1gbit`` (shm and tc rates; shaped links need root, else shm only),
``--ranks-per-node R`` (two-tier emulation: shm inside a node of R ranks, the shaped link
between nodes), ``--nprocs 2,3,4`` (world sizes of the sweeps; the quick suite's headline
uses 4), ``--holdout-link 500mbit`` (a rate the raw-MPI sweep measures but the α–β model
never fits: it predicts it), ``--profile`` (py-spy on every rank of every job: flame graphs
and time shares), ``--train-methods``/``--train-steps`` (train suite), ``--tiny`` (smallest
sizes: the suite's own test), ``--out DIR`` (default ``perf/results/<date>-<host>/<suite>``).

Everything goes to the output folder: ``records.json`` (all records, tagged with bench,
link, ranks_per_node, world_size), ``raw/`` (each job's JSON), ``logs/``, ``run.json``,
``report.md`` and ``plots/*.png``. ``python -m perf report DIR`` rebuilds the report.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from perf import netem
from perf.report import write_report

REPO_ROOT = Path(__file__).resolve().parent.parent
PERF_DIR = REPO_ROOT / "perf"
SUITES = ("quick", "collectives", "sparse", "kernels", "train", "all")


@dataclass
class Job:
    """One benchmark launch. `module` runs as ``python -m module *args --json OUT``."""

    name: str
    module: str
    nprocs: int
    link: str = "shm"
    args: list[str] = field(default_factory=list)
    ranks_per_node: int | None = None
    mpi: bool = True            # False: one plain process (kernels)
    timeout: float = 300.0
    profile: bool = False       # py-spy on every rank (--profile)
    driver: bool = False        # a script that launches its own mpirun jobs through perf.netem
    kind: str = "bench"         # "bench": JSON records; "train": perf/train_bench.py handles it


def module_available(module: str) -> bool:
    return (REPO_ROOT / (module.replace(".", "/") + ".py")).exists()


def _sizes(tiny: bool, small: str, normal: str) -> str:
    return small if tiny else normal


def build_jobs(suite: str, links: list[str], nprocs: list[int], tiny: bool,
               ranks_per_node: int | None, holdout_links: list[str] = (),
               train_methods: str | None = None, train_steps: int = 60) -> list[Job]:
    """The jobs of a suite over the given links and world sizes. The raw-MPI sweep also runs
    over `holdout_links`, which the α–β model never fits: it predicts them."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    jobs: list[Job] = []
    largest = max(nprocs)
    shaped = [lk for lk in links if lk != "shm"]

    def rpn_for(link: str, n: int) -> int | None:
        if link == "shm" or ranks_per_node is None:
            return None
        return ranks_per_node if n % ranks_per_node == 0 else None

    def add(name: str, module: str, n: int, link: str, args: list[str], **kw) -> None:
        rpn = rpn_for(link, n)
        tag = f"{name}-n{n}-{link}" + (f"-{rpn}pn" if rpn else "")
        jobs.append(Job(tag, module, n, link, args, ranks_per_node=rpn, **kw))

    if suite in ("quick", "collectives", "all"):
        # Raw MPI sweep: cheap (no torch import), gives the α–β fit its points at every P.
        sizes = _sizes(tiny, "1k,64k", "1k,16k,256k,1m" if suite == "quick" else "1k,16k,256k,1m,4m")
        for link in [*links, *holdout_links]:
            for n in nprocs:
                # Ping-pong does not depend on the world size: measured once, at the smallest.
                ops = "pingpong,allreduce" if n == min(nprocs) else "allreduce"
                add("mpi-sweep", "perf._pingpong", n, link,
                    ["--ops", ops, "--sizes", sizes, "--budget-mb", "2" if tiny else "8"]
                    + (["--repeats", "1"] if tiny else []), timeout=180)
    if suite in ("quick", "collectives", "all"):
        coll_sizes = _sizes(tiny, "4k,64k", "4k,256k,1m" if suite == "quick" else "1k,16k,256k,1m,4m")
        ops = "allreduce" if suite == "quick" else "allreduce,allgather,reduce_scatter,broadcast,alltoall"
        sizes_n = [largest] if suite == "quick" else nprocs
        for link in links:
            for n in sizes_n:
                add("collectives", "perf.collectives", n, link,
                    ["--ops", ops, "--sizes", coll_sizes, "--impls", "mpi4py,commrt,gloo"]
                    + (["--repeats", "1", "--budget-mb", "1", "--min-iters", "2", "--max-iters", "10"]
                       if tiny else ["--repeats", "3", "--budget-mb", "8", "--max-iters", "50"]),
                    timeout=600)
    if suite in ("collectives", "all") and "shm" in links:
        # perf.backend: the torch backend against raw mpi4py on the same buffers, rounds
        # alternated (per-call overhead and throughput ratio; the targets are shm).
        for n in nprocs:
            add("backend", "perf.backend", n, "shm",
                ["--worker", "--sizes", _sizes(tiny, "1k,64k", "1k,4k,64k,1m,4m")]
                + (["--rounds", "2", "--warmup", "1", "--budget-mb", "0.5"] if tiny
                   else ["--rounds", "9"]), timeout=900)
    if suite in ("quick", "sparse", "all"):
        # perf.sparse drives its own mpirun jobs (one per link and world size) through netem.
        sp_links = (shaped or links) if suite == "quick" else links
        quick = suite == "quick" or tiny
        jobs.append(Job(
            "sparse", "perf.sparse", largest, ",".join(sp_links),
            ["--sizes", "16K" if tiny else ("1M" if quick else "256K,1M"),
             "--densities", "0.01" if quick else "0.001,0.01",
             "--world-sizes", str(largest) if quick else ",".join(map(str, nprocs)),
             "--links", ",".join(sp_links),
             "--algorithms", "dense,spardl" if tiny else (
                 "dense,spardl,topka,quant8" if quick
                 else "dense,spardl,spardl2,topka,gtopk,quant8,quant1"),
             "--iters", "2" if tiny else "3", "--out", "{out}/sparse"],
            mpi=False, driver=True, timeout=600 if quick else 1800))
    if suite in ("quick", "kernels", "all"):
        kargs = ["--quick"] if suite == "quick" else []
        if tiny:
            kargs = ["--sizes", "4k", "--densities", "0.01", "--repeat", "1"]
        jobs.append(Job("kernels", "perf.kernels", 1, "shm", kargs, mpi=False, timeout=300))
    if suite in ("train", "all"):
        link = shaped[0] if shaped else "shm"
        # perf.overlap drives its own jobs: exposed communication of DDP/ZeRO-1/DPU/ACCO/CDP.
        jobs.append(Job("overlap", "perf.overlap", largest, ",".join(links),
                        ["--nprocs", str(largest), "--links", *links, "--out", "{out}/overlap"]
                        + (["--steps", "2", "--methods", "ddp", "zero1", "--no-memory"] if tiny else []),
                        mpi=False, driver=True, timeout=1800, kind="driver"))
        targs = ["--tiny"] if tiny else ["--steps", str(train_steps)]
        if train_methods:
            targs += ["--methods", train_methods]
        jobs.append(Job(f"train-n{largest}-{link}", "perf.train_bench", largest, link, targs,
                        ranks_per_node=rpn_for(link, largest), mpi=False, driver=True,
                        timeout=5400, kind="train"))
        # perf.methods: DDP vs the hybrid methods (DeMo, FlexDeMo, EDiT, A-EDiT) on two-tier
        # nodes (shm inside, the shaped link between): needs an even world size.
        if not tiny and largest % 2 == 0 and shaped:
            jobs.append(Job("methods-hybrid", "perf.methods", largest, link,
                            ["--out", "{out}/methods", "--link", link, "--nprocs", str(largest),
                             "--ranks-per-node", str(ranks_per_node or largest // 2),
                             "--steps", str(train_steps)],
                            mpi=False, driver=True, timeout=3600, kind="driver"))
    return jobs


def normalize(record: dict) -> dict:
    """Map other benchmarks' field names onto the suite's collective record
    (op, impl, bytes, count, dtype, time_us, algbw_gbps, busbw_gbps, messages)."""
    r = dict(record)
    if "time_us" not in r and r.get("time_ms") is not None:
        r["time_us"] = 1e3 * float(r["time_ms"])
    if "algorithm" in r and "impl" not in r:
        # perf.sparse: one implementation per algorithm and density; dense is the baseline.
        density = r.get("density")
        r["impl"] = r["algorithm"] + (f" rho={density:g}" if density and r["algorithm"] not in
                                      ("dense", "quant8", "quant1") else "")
        r.setdefault("op", "allreduce")
        if "n" in r and "bytes" not in r:
            r["count"], r["bytes"], r["dtype"] = int(r["n"]), 4 * int(r["n"]), "float32"
    if "messages" not in r and r.get("messages_max") is not None:
        r["messages"] = r["messages_max"]
    if "op" in r and r.get("time_us") and r.get("bytes") and r.get("world_size") \
            and "algbw_gbps" not in r:
        from perf.model import bus_factor
        r["algbw_gbps"] = float(r["bytes"]) / float(r["time_us"]) / 1e3
        r["busbw_gbps"] = r["algbw_gbps"] * bus_factor(r["op"], int(r["world_size"]))
    return r


def _tag(records: list, job: Job) -> list[dict]:
    bench = job.module.split(".")[-1].lstrip("_")
    out = []
    for r in records:
        if not isinstance(r, dict):
            continue
        r = normalize(r)
        r.setdefault("bench", bench)
        if job.mpi:
            r["link"] = job.link
            r["ranks_per_node"] = job.ranks_per_node
            r.setdefault("world_size", job.nprocs)
        else:
            # A driver launched its own jobs and tagged their links; a plain process ran on none.
            r.setdefault("link", job.link if "," not in job.link else "shm")
            r.setdefault("ranks_per_node", job.ranks_per_node)
        out.append(r)
    return out


def run_job(job: Job, out_dir: Path) -> tuple[dict, list[dict]]:
    """Run one job; return its status entry for run.json and its tagged records."""
    raw = out_dir / "raw" / f"{job.name}.json"
    log = out_dir / "logs" / f"{job.name}.log"
    entry = dict(name=job.name, module=job.module, nprocs=job.nprocs, link=job.link,
                 ranks_per_node=job.ranks_per_node, args=job.args)
    if not module_available(job.module):
        entry.update(status="skipped", error=f"{job.module} not present in this checkout")
        print(f"  [skip] {job.name}: {entry['error']}", flush=True)
        return entry, []
    start = time.perf_counter()
    # Load average beside every job: on a shared machine it says how far to trust the timings.
    entry["load_before"] = round(os.getloadavg()[0], 1)
    args = [a.replace("{out}", str(out_dir)) for a in job.args]
    if job.kind != "driver":
        args += ["--json", str(raw)]
    extra_env = {"COMMRT_PERF_PROFILE": str(out_dir / "profile")} if job.profile else {}
    try:
        if job.kind == "train":
            args += ["--link", job.link, "--nprocs", str(job.nprocs), "--out", str(out_dir / "train")]
            if job.ranks_per_node:
                args += ["--ranks-per-node", str(job.ranks_per_node)]
        if job.mpi:
            proc = netem.launch_mpi(job.nprocs, job.module, args, link=job.link,
                                    ranks_per_node=job.ranks_per_node, timeout=job.timeout,
                                    env=extra_env, check=False)
        else:
            prefix: list[str] = []
            if job.profile and not job.driver:
                from perf.profile import wrap_command
                prefix = wrap_command(out_dir / "profile" / job.name)
            proc = subprocess.run([*prefix, sys.executable, "-m", job.module, *args], cwd=str(REPO_ROOT),
                                  env=netem.job_env(1, extra_env), capture_output=True, text=True,
                                  timeout=job.timeout)
        log.write_text(f"$ {shlex.join(proc.args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if proc.returncode != 0:
            entry.update(status=f"failed (exit {proc.returncode})",
                         error=(proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip())
        else:
            entry["status"] = "ok"
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"timeout after {job.timeout}s\n{exc.stdout or ''}\n{exc.stderr or ''}")
        entry.update(status=f"timeout ({job.timeout:.0f}s)", error=str(exc.stderr or "")[-3000:])
    except netem.LinkUnavailable as exc:
        entry.update(status="skipped", error=str(exc))
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    entry["load_after"] = round(os.getloadavg()[0], 1)
    records: list[dict] = []
    if raw.exists():
        try:
            loaded = json.loads(raw.read_text())
            records = _tag(loaded if isinstance(loaded, list) else loaded.get("records", []), job)
        except json.JSONDecodeError as exc:
            entry.update(status="bad json", error=str(exc))
    entry["records"] = len(records)
    print(f"  [{entry['status']}] {job.name}: {len(records)} records, {entry['wall_s']} s", flush=True)
    return entry, records


def default_out_dir(suite: str) -> Path:
    host = socket.gethostname().split(".")[0] or "host"
    return PERF_DIR / "results" / f"{_dt.date.today().isoformat()}-{host}" / suite


def select_links(links: list[str]) -> tuple[list[str], dict[str, str]]:
    """(links that can run, {link: why not}); shm replaces shaped links that cannot run."""
    reason = netem.link_unavailable_reason()
    usable = [lk for lk in links if lk == "shm" or reason is None]
    skipped = {lk: reason for lk in links if lk != "shm" and reason is not None}
    if skipped and "shm" not in usable:
        usable.append("shm")
    return usable, skipped


def run_suite(suite: str, links: list[str], nprocs: list[int], out_dir: Path, *, tiny: bool = False,
              ranks_per_node: int | None = None, profile: bool = False,
              holdout_links: list[str] = (), train_methods: str | None = None,
              train_steps: int = 60, command: str = "") -> Path:
    """Run a suite end to end; return the report path. Shaped links that cannot be built
    (no root / ip / tc) are dropped with a message and the shm cases still run."""
    for link in [*links, *holdout_links]:
        if netem.link_rate_bps(link) is None and link in holdout_links:
            raise ValueError("a held-out link must be a shaped rate, not shm")
    holdout_links = [h for h in holdout_links if h not in links]
    usable, skipped = select_links(links)
    if skipped:
        holdout_links = []
        print(f"perf: cannot emulate {', '.join(skipped)}: {next(iter(skipped.values()))}; "
              "running shm only", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("raw", "logs"):
        (out_dir / sub).mkdir(exist_ok=True)
    jobs = build_jobs(suite, usable, nprocs, tiny, ranks_per_node, holdout_links,
                      train_methods, train_steps)
    if profile:
        for job in jobs:
            job.profile = True
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    run = dict(suite=suite, host=socket.gethostname(), started=started, machine=_machine(),
               cores=os.cpu_count(), command=command, links=usable,
               holdout_links=holdout_links, links_skipped=skipped, nprocs=nprocs,
               ranks_per_node=ranks_per_node, tiny=tiny,
               profile=profile, jobs=[])
    records: list[dict] = []
    start = time.perf_counter()
    print(f"perf: suite {suite}, {len(jobs)} jobs -> {out_dir}", flush=True)
    interrupted = False
    try:
        for job in jobs:
            entry, recs = run_job(job, out_dir)
            run["jobs"].append(entry)
            records += recs
    except KeyboardInterrupt:
        interrupted = True
        print("perf: interrupted; writing the partial report", flush=True)
    finally:
        run["wall_s"] = round(time.perf_counter() - start, 1)
        run["interrupted"] = interrupted
        if profile:
            from perf.profile import summarize
            summarize(out_dir / "profile")
        (out_dir / "records.json").write_text(json.dumps(records, indent=1))
        (out_dir / "run.json").write_text(json.dumps(run, indent=1))
        path = write_report(out_dir)
    print(f"perf: report {path} ({run['wall_s']} s)", flush=True)
    if interrupted:
        raise SystemExit(130)
    return path


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    # nvidia-smi rather than importing torch: an import costs seconds on a loaded machine.
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.split("\n")
            gpu = ", GPU " + names[0].strip() if names and names[0].strip() else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{os.cpu_count()} cores, {cpu}{gpu}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite")
    run.add_argument("suite", choices=SUITES)
    run.add_argument("--link", default="shm,1gbit",
                     help="comma list: shm and tc rates such as 100mbit,1gbit,10gbit")
    run.add_argument("--nprocs", default="2,3,4", help="world sizes of the sweeps")
    run.add_argument("--ranks-per-node", type=int, default=None,
                     help="two-tier emulation: shm inside a node of R ranks, shaped link between nodes")
    run.add_argument("--holdout-link", default="500mbit",
                     help="shaped rate(s) measured by the raw-MPI sweep only and predicted by the "
                          "α–β model fitted on the other links ('' for none)")
    run.add_argument("--train-methods", default=None,
                     help="methods of the train suite (default: every method of commrt.train)")
    run.add_argument("--train-steps", type=int, default=60, help="optimizer steps per method")
    run.add_argument("--profile", action="store_true", help="record every rank with py-spy")
    run.add_argument("--tiny", action="store_true", help="smallest sizes (the suite's own test)")
    run.add_argument("--out", default=None, help="output folder")
    rep = sub.add_parser("report", help="rebuild report.md and plots from a results folder")
    rep.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(write_report(args.dir))
        return
    links = [s.strip().lower() for s in args.link.split(",") if s.strip()]
    nprocs = sorted({int(s) for s in args.nprocs.split(",") if s.strip()})
    if not nprocs or min(nprocs) < 1:
        parser.error("--nprocs needs positive world sizes")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        parser.error("--ranks-per-node must be >= 1")
    out = Path(args.out) if args.out else default_out_dir(args.suite)
    run_suite(args.suite, links, nprocs, out, tiny=args.tiny, ranks_per_node=args.ranks_per_node,
              profile=args.profile,
              holdout_links=[s.strip().lower() for s in args.holdout_link.split(",") if s.strip()],
              train_methods=args.train_methods, train_steps=args.train_steps,
              command="python -m perf " + shlex.join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
