"""Point-to-point on the `commrt` backend: send/recv (tags, dtypes, non-contiguous),
isend/irecv, recv from any source (the sender reported), batch_isend_irecv rings.

One launch per world size runs every check below; each rank prints ``CHECK <name> rank
<r> OK|FAIL`` and one pytest test per (world size, check) reads it. Inputs are fresh per
launch (`rank_input` from the launch's seed, printed on failure)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from backend_util import assert_close, init_commrt, rank_input
from harness import assert_check, checks_fixture, run_checks

WORLD_SIZES = [2, 3, 5]


def _ring() -> tuple[int, int, int, int]:
    """(rank, P, right neighbour, left neighbour)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    return rank, P, (rank + 1) % P, (rank - 1) % P


def _check_send_recv(seed):
    """Blocking send/recv around a ring, several dtypes; even ranks send first."""
    rank, P, right, left = _ring()
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        mine = rank_input(seed, rank, f"ring{dtype}", (6,), dtype)
        got = torch.empty(6, dtype=dtype)
        if rank % 2 == 0:
            dist.send(mine, dst=right)
            dist.recv(got, src=left)
        else:
            dist.recv(got, src=left)
            dist.send(mine, dst=right)
        assert_close(got, rank_input(seed, left, f"ring{dtype}", (6,), dtype), f"ring {dtype}")


def _check_tags(seed):
    """isend/irecv with tags, messages received in the reverse order of the tags they
    carry; the receive target is a non-contiguous view."""
    rank, P, right, left = _ring()
    reqs = [dist.isend(rank_input(seed, rank, f"tag{t}", (4,), torch.float64), dst=right, tag=t)
            for t in (1, 2, 3)]
    bufs = {t: torch.zeros(4, 2, dtype=torch.float64)[:, 1] for t in (1, 2, 3)}
    rreqs = [dist.irecv(bufs[t], src=left, tag=t) for t in (3, 2, 1)]
    for w in rreqs + reqs:
        w.wait()
    for t in (1, 2, 3):
        assert_close(bufs[t], rank_input(seed, left, f"tag{t}", (4,), torch.float64), f"tag {t}")


def _check_any_source(seed):
    """recv from any source: rank 0 collects one message from every other rank; an irecv
    from any source reports its sender through the Work."""
    rank, P, _, _ = _ring()
    if rank == 0:
        senders = set()
        for _ in range(P - 1):
            buf = torch.empty(3)
            src = dist.recv(buf, tag=5)  # a tag of its own: later checks can't match
            assert torch.equal(buf, torch.full((3,), float(src))), \
                f"any-source recv: {buf} claimed to come from {src}"
            senders.add(src)
        assert senders == set(range(1, P)), f"any-source recv saw senders {senders}"
        buf = torch.empty(1)
        work = dist.irecv(buf, tag=7)
        work.wait()
        assert buf.item() == 1.0 and work._source_rank() == 1, \
            f"irecv any-source: {buf} from {work._source_rank()}"
    else:
        dist.send(torch.full((3,), float(rank)), dst=0, tag=5)
        if rank == 1:
            dist.send(torch.ones(1), dst=0, tag=7)


def _check_batch(seed):
    """batch_isend_irecv: both directions of the ring in one batch, recv listed first."""
    rank, P, right, left = _ring()
    for dtype in (torch.float32, torch.int16):
        to_right = rank_input(seed, rank, f"br{dtype}", (5,), dtype)
        to_left = rank_input(seed, rank, f"bl{dtype}", (5,), dtype)
        from_left, from_right = torch.empty(5, dtype=dtype), torch.empty(5, dtype=dtype)
        ops = [dist.P2POp(dist.irecv, from_left, left), dist.P2POp(dist.irecv, from_right, right),
               dist.P2POp(dist.isend, to_right, right), dist.P2POp(dist.isend, to_left, left)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if P > 2:  # with two ranks both neighbours are one rank: which recv gets which is open
            assert_close(from_left, rank_input(seed, left, f"br{dtype}", (5,), dtype),
                         "batch left")
            assert_close(from_right, rank_input(seed, right, f"bl{dtype}", (5,), dtype),
                         "batch right")


def _check_batch_futures(seed):
    rank, P, right, left = _ring()
    out = torch.empty(2)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), float(rank)), right),
                                    dist.P2POp(dist.irecv, out, left)])
    torch.futures.wait_all([w.get_future() for w in works])
    assert_close(out, torch.full((2,), float(left)), "batch with futures")
    dist.barrier()


CHECKS = {"send_recv": _check_send_recv, "tags": _check_tags, "any_source": _check_any_source,
          "batch": _check_batch, "batch_futures": _check_batch_futures}


def _p2p_worker(seed: int) -> None:
    init_commrt()
    run_checks(CHECKS, seed, rank=dist.get_rank())
    dist.destroy_process_group()


launch = checks_fixture(_p2p_worker, WORLD_SIZES, timeout=180)


@pytest.mark.parametrize("check", CHECKS)
def test_backend_p2p(launch, check):
    assert_check(launch, check)
