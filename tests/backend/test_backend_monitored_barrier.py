"""`CommrtProcessGroup.monitored_barrier` (gloo's semantics) and the default group's own
communicator: a rank that does not arrive is named on rank 0 within the timeout (0 expires
at once), and the group stays usable afterwards: the late ack cannot match a later barrier,
user send/recv or collective."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from harness import generator, run_ranks


def _expect_error(fn, pattern: str) -> None:
    import re
    try:
        fn()
    except RuntimeError as exc:
        if not re.search(pattern, str(exc)):
            raise AssertionError(f"error {exc!s} does not match {pattern!r}") from exc
        return
    raise AssertionError(f"expected RuntimeError matching {pattern!r}")


def _worker(seed: int) -> None:
    dist.init_process_group("commrt", timeout=timedelta(seconds=30))
    rank, size = dist.get_rank(), dist.get_world_size()
    pg = dist.group.WORLD
    world = pg.communicator
    # The default group runs on its own duplicate of MPI's world, not on the world itself.
    from commrt import transports as T
    assert world.mpi != T.world().mpi and world.congruent(T.world())

    pg.monitored_barrier(timedelta(seconds=20))  # everybody arrives
    pg.monitored_barrier(timedelta(seconds=20), wait_all_ranks=True)

    # Timeout 0 on rank 0 alone (on a group of its own, as every rank must call a group's
    # monitored_barrier equally often): expires at once (one rank has nobody to wait for).
    alone = dist.new_group(list(range(size)))
    if rank == 0 and size > 1:
        t0 = time.monotonic()
        _expect_error(lambda: alone.monitored_barrier(timedelta(0)),
                      "Rank 0 timed out in monitoredBarrier")
        assert time.monotonic() - t0 < 5
    dist.barrier()

    # The last rank is late (on a group with a 2 s timeout, which bounds how long the
    # other ranks wait for rank 0's reply): rank 0 names it, the others give up on rank 0;
    # the late rank's ack is left behind on rank 0.
    short = dist.new_group(list(range(size)), timeout=timedelta(seconds=2))
    late = size - 1
    if rank == 0 and size > 1:
        _expect_error(lambda: short.monitored_barrier(timedelta(seconds=0.5)),
                      f"Rank {late} failed to pass monitoredBarrier in 500 ms")
    elif rank != 0:
        if rank == late:
            time.sleep(1.0)
        _expect_error(lambda: short.monitored_barrier(timedelta(seconds=0.5)),
                      f"Rank {rank} successfully reached monitoredBarrier, but received errors")
    dist.barrier()
    short.monitored_barrier(timedelta(seconds=20))  # the stale ack does not count here
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x, group=short)
    assert torch.equal(x, torch.full((3,), size * (size + 1) / 2)), x
    dist.barrier()

    # All ranks but 0 late, wait_all_ranks: all are named.
    if rank == 0 and size > 1:
        names = ", ".join(str(r) for r in range(1, size))
        _expect_error(lambda: alone.monitored_barrier(timedelta(seconds=0.3), wait_all_ranks=True),
                      f"Ranks {names} failed to pass monitoredBarrier in 300 ms")
    dist.barrier()

    # The group is still usable: fresh random data through a collective and p2p.
    x = torch.randn(17, generator=generator(seed, rank), dtype=torch.float64)
    ref = sum(torch.randn(17, generator=generator(seed, r), dtype=torch.float64)
              for r in range(size))
    y = x.clone()
    dist.all_reduce(y)
    if not torch.allclose(y, ref):
        raise AssertionError(f"seed {seed}: all_reduce after monitored_barrier failures")
    if size > 1:
        if rank == 0:
            dist.send(x, 1, tag=1)
        elif rank == 1:
            z = torch.empty_like(x)
            dist.recv(z, 0, tag=1)
            ref0 = torch.randn(17, generator=generator(seed, 0), dtype=torch.float64)
            if not torch.equal(z, ref0):
                raise AssertionError(f"seed {seed}: recv after monitored_barrier failures")
    pg.monitored_barrier(timedelta(seconds=20))  # a later barrier passes, stale acks ignored
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_monitored_barrier(nprocs: int, seed: int) -> None:
    out = run_ranks(_worker, nprocs, timeout=120, seed=seed)
    assert "Traceback" not in out, f"seed {seed}:\n{out}"
