"""The perf suite's command line: ``python -m perf run SUITE`` (from the repository root).

Suites (each launches its own ``mpirun`` jobs, over every requested link):

  quick        < 5 min on 2 cores: raw-MPI α–β sweep (2–4 ranks), allreduce of raw mpi4py /
               commrt / gloo and SparDL vs dense on 4 ranks, a small kernel run; headline
               numbers (commrt/raw-MPI throughput, SparDL speedup at 1 Gbit/s), model check.
  collectives  nccl-tests sweeps of every dense collective, raw mpi4py / commrt / gloo,
               world sizes 2..4 (non powers of two included); the backend against raw
               mpi4py on the same buffers, rounds alternated (perf/bench/backend.py, shm).
  sparse       every sparse / quantized algorithm against dense.
  kernels      the compression kernels, single process.
  train        every method of ``python -m commrt.train`` on one link: time-to-target-loss,
               loss vs wall clock, exposed communication (perf/bench/train_bench.py).
  all          all of the above.

Options: ``--link shm,1gbit`` (shm and tc rates; shaped links need root, else shm only),
``--ranks-per-node R`` (two-tier emulation: shm inside a node of R ranks, the shaped link
between nodes), ``--nprocs 2,3,4`` (world sizes of the sweeps; the quick suite's headline
uses 4), ``--holdout-link 500mbit`` (a rate the raw-MPI sweep measures but the α–β model
never fits: it predicts it), ``--profile`` (py-spy on every rank of every job: flame graphs
and time shares), ``--train-methods``/``--train-steps`` (train suite), ``--tiny`` (smallest
sizes: the suite's own test), ``--out DIR`` (default ``results/<date>-<host>/<suite>``).

Everything goes to the output folder: ``records.json`` (all records, tagged with bench,
link, ranks_per_node, world_size), ``raw/`` (each job's JSON), ``logs/``, ``run.json``,
``report.md`` and ``plots/*.png``. ``python -m perf report DIR`` rebuilds the report.

What each suite runs is data (perf/suites.py); perf/runner.py runs it.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from perf.analysis.report import write_report
from perf.infra.units import comma_list
from perf.runner import default_out_dir, run_suite
from perf.suites import SUITES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite")
    run.add_argument("suite", choices=SUITES)
    run.add_argument("--link", default="shm,1gbit",
                     help="comma list: shm and tc rates such as 100mbit,1gbit,10gbit")
    run.add_argument("--nprocs", default="2,3,4", help="world sizes of the sweeps")
    run.add_argument("--ranks-per-node", type=int, default=None,
                     help="two-tier emulation: shm inside a node of R ranks, shaped link "
                          "between nodes")
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
    links = comma_list(args.link, str.lower)
    nprocs = sorted(set(comma_list(args.nprocs, int)))
    if not nprocs or min(nprocs) < 1:
        parser.error("--nprocs needs positive world sizes")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        parser.error("--ranks-per-node must be >= 1")
    out = Path(args.out) if args.out else default_out_dir(args.suite)
    run_suite(args.suite, links, nprocs, out, tiny=args.tiny, ranks_per_node=args.ranks_per_node,
              profile=args.profile,
              holdout_links=comma_list(args.holdout_link, str.lower),
              train_methods=args.train_methods, train_steps=args.train_steps,
              command="python -m perf " + shlex.join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
