"""Ranks started without mpirun, for tests/backend/test_backend_launchers.py.

    python -m torch.distributed.run --nproc-per-node N tests/support/worker_launcher.py ddp SEED
    python tests/support/worker_launcher.py spawn-ddp METHOD N SEED INIT_URL
    python tests/support/worker_launcher.py spawn-SCENARIO METHOD N INIT_URL

`ddp` trains DistributedDataParallel on the `commrt` backend and checks the parameters
against one process training on the whole batch (the assertion fails the rank), then
prints ``RANK-OK r``. The other scenarios are the failure cases: `missing` (the last rank
never calls init_process_group), `killed` (rank 1 is killed after init), `premature`
(MPI used before init_process_group), `unjoined` (MPI starts without joining the PMI
server, as another MPI library would), `server-killed` (rank 0 kills the PMI server
after init; the ranks then exit without MPI_Finalize, status 1). Each rank prints what
init or the operation raised as ``RANK-ERROR r: message`` and exits normally.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backend_util import train_ddp_and_check

import commrt  # noqa: F401  (registers the backend)

STEPS, PER_RANK, LR = 3, 3, 0.05


def _init(rank: int, size: int, url: str | None, timeout_s: float = 120.0) -> None:
    kwargs = {} if url is None else dict(init_method=url, rank=rank, world_size=size)
    dist.init_process_group("commrt", timeout=timedelta(seconds=timeout_s), **kwargs)


def ddp(rank: int, size: int, seed: int, url: str | None = None) -> None:
    _init(rank, size, url)
    train_ddp_and_check(rank, size, seed, STEPS, PER_RANK, LR)
    dist.destroy_process_group()
    print(f"RANK-OK {rank}", flush=True)


def scenario(rank: int, name: str, size: int, url: str) -> None:
    try:
        if name == "missing" and rank == size - 1:
            time.sleep(20)          # never joins: the others' init must fail first
            return
        if name == "premature":
            from mpi4py import MPI  # noqa: F401  (starts MPI: this rank is a world of one)
        if name == "unjoined":      # as an MPI that ignores MPICH's PMI variables would
            import commrt.transports as T
            T.pmi_bootstrap = lambda *args, **kwargs: None
        _init(rank, size, url, timeout_s=6.0)
        if name == "killed":
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.barrier()          # rank 1 never arrives: times out, the job ends
        if name == "server-killed":
            dist.barrier()
            if rank == 0:           # (the only PMI server running: tests run one at a time)
                subprocess.run(["pkill", "-9", "-f", "--", "-m commrt.transports.pmi"], check=False)
            dist.barrier()
            total = torch.ones(2)
            dist.all_reduce(total)  # the job goes on: MPI needs the server at start and end
            assert total.tolist() == [size, size]
        dist.destroy_process_group()
        print(f"RANK-OK {rank}", flush=True)
    except Exception as exc:
        # Printed, not raised: torch.multiprocessing would end the other ranks at the
        # first failure, before they report theirs.
        print(f"RANK-ERROR {rank}: {exc}", flush=True)


def _spawned_ddp(rank: int, size: int, seed: int, url: str) -> None:
    ddp(rank, size, seed, url)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "ddp":           # under torchrun: env://
        ddp(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(argv[1]))
    elif mode == "spawn-ddp":
        method, size, seed, url = argv[1], int(argv[2]), int(argv[3]), argv[4]
        mp.start_processes(_spawned_ddp, args=(size, seed, url), nprocs=size,
                           start_method=method)
    elif mode.startswith("spawn-"):
        method, size, url = argv[1], int(argv[2]), argv[3]
        mp.start_processes(scenario, args=(mode[len("spawn-"):], size, url), nprocs=size,
                           start_method=method)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
