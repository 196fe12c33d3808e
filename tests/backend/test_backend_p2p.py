"""Point-to-point on the `commrt` backend: send/recv (tags, dtypes, non-contiguous),
isend/irecv, recv from any source (the sender reported), batch_isend_irecv rings."""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from _backend_util import assert_close, init_commrt, rank_input
from mpi_harness import run_ranks


def _p2p_worker(seed: int) -> None:
    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % P, (rank - 1) % P

    # blocking send/recv around a ring, several dtypes; even ranks send first
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        mine = rank_input(seed, rank, f"ring{dtype}", (6,), dtype)
        got = torch.empty(6, dtype=dtype)
        if rank % 2 == 0:
            dist.send(mine, dst=right)
            dist.recv(got, src=left)
        else:
            dist.recv(got, src=left)
            dist.send(mine, dst=right)
        if P > 1 or rank % 2 == 0:
            assert_close(got, rank_input(seed, left, f"ring{dtype}", (6,), dtype), f"ring {dtype}")

    # isend/irecv with tags, messages received in the reverse order of the tags they carry;
    # the receive target is a non-contiguous view
    reqs = [dist.isend(rank_input(seed, rank, f"tag{t}", (4,), torch.float64), dst=right, tag=t)
            for t in (1, 2, 3)]
    bufs = {t: torch.zeros(4, 2, dtype=torch.float64)[:, 1] for t in (1, 2, 3)}
    rreqs = [dist.irecv(bufs[t], src=left, tag=t) for t in (3, 2, 1)]
    for w in rreqs + reqs:
        w.wait()
    for t in (1, 2, 3):
        assert_close(bufs[t], rank_input(seed, left, f"tag{t}", (4,), torch.float64), f"tag {t}")

    # recv from any source: rank 0 collects one message from every other rank
    if rank == 0:
        senders = set()
        for _ in range(P - 1):
            buf = torch.empty(3)
            src = dist.recv(buf, tag=5)  # a tag of its own: later phases can't match
            if not torch.equal(buf, torch.full((3,), float(src))):
                raise AssertionError(f"any-source recv: {buf} claimed to come from {src}")
            senders.add(src)
        if senders != set(range(1, P)):
            raise AssertionError(f"any-source recv saw senders {senders}")
        # an irecv from any source reports its sender through the Work
        if P > 1:
            buf = torch.empty(1)
            work = dist.irecv(buf, tag=7)
            work.wait()
            if buf.item() != 1.0 or work._source_rank() != 1:
                raise AssertionError(f"irecv any-source: {buf} from {work._source_rank()}")
    else:
        dist.send(torch.full((3,), float(rank)), dst=0, tag=5)
        if rank == 1:
            dist.send(torch.ones(1), dst=0, tag=7)

    # batch_isend_irecv: both directions of the ring in one batch, recv listed first
    for dtype in (torch.float32, torch.int16):
        to_right = rank_input(seed, rank, f"br{dtype}", (5,), dtype)
        to_left = rank_input(seed, rank, f"bl{dtype}", (5,), dtype)
        from_left, from_right = torch.empty(5, dtype=dtype), torch.empty(5, dtype=dtype)
        ops = [dist.P2POp(dist.irecv, from_left, left), dist.P2POp(dist.irecv, from_right, right),
               dist.P2POp(dist.isend, to_right, right), dist.P2POp(dist.isend, to_left, left)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if P > 2:
            assert_close(from_left, rank_input(seed, left, f"br{dtype}", (5,), dtype), "batch left")
            assert_close(from_right, rank_input(seed, right, f"bl{dtype}", (5,), dtype),
                         "batch right")
    # batch with futures
    out = torch.empty(2)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), float(rank)), right),
                                    dist.P2POp(dist.irecv, out, left)])
    torch.futures.wait_all([w.get_future() for w in works])
    assert_close(out, torch.full((2,), float(left)), "batch with futures")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [2, 3, 5])
def test_backend_p2p(nprocs: int) -> None:
    run_ranks(_p2p_worker, nprocs, timeout=180, seed=random.randrange(1 << 30))
