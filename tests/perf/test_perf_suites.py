"""perf/suites.py: the suites' data expands to the jobs written out here by hand (names,
modules, world sizes, links, flags, launch kinds), and every module a suite names exists."""
import pytest

from perf import suites
from perf.runner import module_available


def _rows(jobs):
    return [(j.name, j.module, j.nprocs, j.link, " ".join(j.args), j.ranks_per_node, j.mpi,
             j.driver, j.kind, j.timeout) for j in jobs]


def test_perf_suites_quick_tiny():
    jobs = suites.build_jobs("quick", ["shm", "1gbit"], [2, 3], True, None, ["500mbit"])
    tiny_sweep = "--sizes 1k,64k --budget-mb 2 --repeats 1"
    tiny_coll = ("--ops allreduce --sizes 4k,64k --impls mpi4py,commrt,gloo --repeats 1 "
                 "--budget-mb 1 --min-iters 2 --max-iters 10")
    sweep = "perf.bench.pingpong"
    assert _rows(jobs) == [
        ("mpi-sweep-n2-shm", sweep, 2, "shm", f"--ops pingpong,allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("mpi-sweep-n3-shm", sweep, 3, "shm", f"--ops allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("mpi-sweep-n2-1gbit", sweep, 2, "1gbit", f"--ops pingpong,allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("mpi-sweep-n3-1gbit", sweep, 3, "1gbit", f"--ops allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("mpi-sweep-n2-500mbit", sweep, 2, "500mbit", f"--ops pingpong,allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("mpi-sweep-n3-500mbit", sweep, 3, "500mbit", f"--ops allreduce {tiny_sweep}",
         None, True, False, "bench", 180),
        ("collectives-n3-shm", "perf.bench.collectives", 3, "shm", tiny_coll,
         None, True, False, "bench", 600),
        ("collectives-n3-1gbit", "perf.bench.collectives", 3, "1gbit", tiny_coll,
         None, True, False, "bench", 600),
        ("sparse", "perf.bench.sparse", 3, "1gbit",
         "--sizes 16K --densities 0.01 --world-sizes 3 --links 1gbit --algorithms dense,spardl "
         "--iters 2 --out {out}/sparse", None, False, True, "bench", 600),
        ("kernels", "perf.bench.kernels", 1, "shm", "--sizes 4k --densities 0.01 --repeat 1",
         None, False, False, "bench", 300),
    ]


def test_perf_suites_train_two_tier():
    jobs = suites.build_jobs("train", ["shm", "1gbit"], [2, 4], False, 2, [], "ddp,demo", 30)
    assert _rows(jobs) == [
        ("overlap", "perf.bench.overlap", 4, "shm,1gbit",
         "--nprocs 4 --links shm 1gbit --out {out}/overlap", None, False, True, "driver", 1800),
        ("train-n4-1gbit", "perf.bench.train_bench", 4, "1gbit", "--steps 30 --methods ddp,demo",
         2, False, True, "train", 5400),
        ("methods-hybrid", "perf.bench.methods", 4, "1gbit",
         "--out {out}/methods --link 1gbit --nprocs 4 --ranks-per-node 2 --steps 30",
         None, False, True, "driver", 3600),
    ]
    # No shaped link: training on shm, and no two-tier comparison.
    jobs = suites.build_jobs("train", ["shm"], [3], True, None)
    assert [(j.name, j.link, " ".join(j.args)) for j in jobs] == [
        ("overlap", "shm", "--nprocs 3 --links shm --out {out}/overlap --steps 2 --methods ddp "
                           "zero1 --no-memory"),
        ("train-n3-shm", "shm", "--tiny")]


def test_perf_suites_every_module_exists():
    for spec in suites.SPECS:
        assert module_available(spec.module), spec.module
    for suite in suites.SUITES:
        jobs = suites.build_jobs(suite, ["shm", "1gbit"], [2, 4], False, None)
        assert jobs and all(j.timeout > 0 for j in jobs), suite
    collectives = suites.build_jobs("collectives", ["shm"], [2, 3], False, None)
    assert {j.name for j in collectives} >= {"backend-n2-shm", "backend-n3-shm"}
    assert not [j for j in suites.build_jobs("collectives", ["1gbit"], [2], False, None)
                if j.module == "perf.bench.backend"]      # the backend's targets are on shm
    with pytest.raises(ValueError, match="unknown suite"):
        suites.build_jobs("nope", ["shm"], [2], False, None)
