"""Run a suite end to end: its jobs (perf/suites.py), one after the other, each job's
records tagged and collected, then the report (perf/analysis/report.py).

Everything goes to the output folder: ``records.json`` (all records, tagged with bench,
link, ranks_per_node, world_size), ``raw/`` (each job's JSON), ``logs/``, ``run.json``,
``report.md`` and ``plots/*.png``.
"""
from __future__ import annotations

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
from collections.abc import Sequence
from pathlib import Path

from perf import suites
from perf.analysis.report import write_report
from perf.infra import netem
from perf.infra.launch import REPO_ROOT, dated_results_dir, job_env, launch_mpi
from perf.infra.profile import summarize, wrap_command
from perf.infra.units import bus_factor
from perf.suites import Job


def module_available(module: str) -> bool:
    """Whether `module` is a file of this checkout (a job of a missing one is skipped)."""
    return (REPO_ROOT / (module.replace(".", "/") + ".py")).exists()


def normalize(record: dict) -> dict:
    """Map other benchmarks' field names onto the suite's collective record
    (op, impl, bytes, count, dtype, time_us, algbw_gbps, busbw_gbps, messages)."""
    r = dict(record)
    if "time_us" not in r and r.get("time_ms") is not None:
        r["time_us"] = 1e3 * float(r["time_ms"])
    if "algorithm" in r and "impl" not in r:
        # perf.bench.sparse: one implementation per algorithm and density; dense is the baseline.
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
        r["algbw_gbps"] = float(r["bytes"]) / float(r["time_us"]) / 1e3
        r["busbw_gbps"] = r["algbw_gbps"] * bus_factor(r["op"], int(r["world_size"]))
    return r


def _tag(records: list, job: Job) -> list[dict]:
    """The job's records, normalized and tagged with bench, link, ranks_per_node and
    world_size."""
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
            args += ["--link", job.link, "--nprocs", str(job.nprocs),
                     "--out", str(out_dir / "train")]
            if job.ranks_per_node:
                args += ["--ranks-per-node", str(job.ranks_per_node)]
        if job.mpi:
            proc = launch_mpi(job.nprocs, job.module, args, link=job.link,
                              ranks_per_node=job.ranks_per_node, timeout=job.timeout,
                              env=extra_env, check=False)
        else:
            prefix: list[str] = []
            if job.profile and not job.driver:
                prefix = wrap_command(out_dir / "profile" / job.name)
            proc = subprocess.run([*prefix, sys.executable, "-m", job.module, *args],
                                  cwd=str(REPO_ROOT), env=job_env(1, extra_env),
                                  capture_output=True, text=True, timeout=job.timeout)
        log.write_text(f"$ {shlex.join(proc.args)}\n--- stdout\n{proc.stdout}\n"
                       f"--- stderr\n{proc.stderr}")
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
    print(f"  [{entry['status']}] {job.name}: {len(records)} records, {entry['wall_s']} s",
          flush=True)
    return entry, records


def default_out_dir(suite: str) -> Path:
    """``results/<date>-<host>/<suite>``."""
    return dated_results_dir() / suite


def select_links(links: list[str]) -> tuple[list[str], dict[str, str]]:
    """(links that can run, {link: why not}); shm replaces shaped links that cannot run."""
    reason = netem.link_unavailable_reason()
    usable = [lk for lk in links if lk == "shm" or reason is None]
    skipped = {lk: reason for lk in links if lk != "shm" and reason is not None}
    if skipped and "shm" not in usable:
        usable.append("shm")
    return usable, skipped


def run_suite(suite: str, links: list[str], nprocs: list[int], out_dir: Path, *,
              tiny: bool = False, ranks_per_node: int | None = None, profile: bool = False,
              holdout_links: Sequence[str] = (), train_methods: str | None = None,
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
    jobs = suites.build_jobs(suite, usable, nprocs, tiny, ranks_per_node, holdout_links,
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


