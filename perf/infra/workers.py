"""The driver/worker pattern of the MPI benchmarks (perf/bench/backend.py, sparse.py, overlap.py).

One module is both. Run plainly it is the *driver*: it launches ``mpirun`` jobs of the same
module with ``--worker --json FILE``, collects what rank 0 of each job wrote to FILE, and
writes the tables. Under ``--worker`` it is one rank of such a job. This module holds what
both benchmarks share: the driver's common flags, the dispatch, launching one job and
reading its records, and writing them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_driver_arguments(parser: argparse.ArgumentParser, *, timeout: float,
                         out: str | None, out_help: str) -> None:
    """The flags every driver takes: --timeout (seconds per MPI job), --out, --json (the
    records, the perf suite's input) and the hidden --worker."""
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per MPI job")
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--json", default=None, help="also write the records here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def dispatch(args: argparse.Namespace, run_worker: Callable[[argparse.Namespace], Any],
             run_driver: Callable[[argparse.Namespace], int]) -> int:
    """Run as a worker (rank of a job, exit status 0: a failing rank raises) or as the
    driver (its exit status)."""
    if args.worker:
        run_worker(args)
        return 0
    return run_driver(args)


def run_worker_job(launch: Callable[[list[str]], subprocess.CompletedProcess],
                   worker_args: list[str], what: str, failures: list[str]) -> Any | None:
    """One job of workers: ``launch(["--worker", "--json", FILE, *worker_args])`` starts it
    and waits; its output is echoed and the JSON its rank 0 wrote to FILE returned. A job
    that times out, fails or writes nothing returns None, and why (prefixed with `what`) is
    appended to `failures` and printed. Whatever else `launch` raises (a link that cannot be
    emulated) propagates to the caller."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "records.json"
        try:
            proc = launch(["--worker", "--json", str(result), *worker_args])
        except subprocess.TimeoutExpired as exc:
            failures.append(f"{what}: timed out after {exc.timeout:.0f} s")
            print(failures[-1], file=sys.stderr, flush=True)
            return None
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0 or not result.exists():
            failures.append(f"{what}: exit {proc.returncode}")
            print(failures[-1], file=sys.stderr, flush=True)
            sys.stderr.write(proc.stderr[-4000:])
            return None
        return json.loads(result.read_text())


def write_json(path: str | Path | None, data: Any) -> None:
    """Write `data` as indented JSON to `path` (nothing when `path` is None)."""
    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1))
