"""Transport point-to-point: tagged and wildcard receives, every dtype, exact wire bytes."""
import pytest
import torch
from mpi_harness import run_ranks


def _ring_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    P, me = comm.size, comm.rank
    right, left = (me + 1) % P, (me - 1) % P
    T.wire.reset()
    sent = 0
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                  torch.int8, torch.uint8, torch.bool):
        g = torch.Generator().manual_seed(seed + left)
        expected = (torch.randn(513, generator=g) * 10).to(dtype)
        g = torch.Generator().manual_seed(seed + me)
        mine = (torch.randn(513, generator=g) * 10).to(dtype)
        inbox = torch.empty(513, dtype=dtype)
        reqs = [comm.irecv(inbox, left, tag=5), comm.isend(mine, right, tag=5)]
        T.wait_all(reqs)
        assert torch.equal(inbox, expected), f"ring exchange of {dtype}"
        assert reqs[0].source == left and reqs[0].nbytes == mine.numel() * mine.element_size()
        sent += mine.numel() * mine.element_size()
    assert T.wire.bytes("send") == sent and T.wire.messages("send") == 8
    # non-contiguous send and receive
    src = torch.arange(20, dtype=torch.float32).view(4, 5).t()  # transposed view
    dst = torch.zeros(4, 5).t()  # same logical shape as src, other strides
    T.wait_all([comm.irecv(dst, left, tag=9), comm.isend(src, right, tag=9)])
    assert torch.equal(dst, src)
    # tags keep messages apart even when received in the opposite order
    a, b = torch.zeros(3), torch.zeros(3)
    reqs = [comm.isend(torch.full((3,), 1.0), right, tag=1),
            comm.isend(torch.full((3,), 2.0), right, tag=2)]
    comm.irecv(b, left, tag=2).wait()
    comm.irecv(a, left, tag=1).wait()
    T.wait_all(reqs)
    assert a.eq(1).all() and b.eq(2).all()
    # any-source: everyone sends its rank to rank 0, which learns who sent what
    if me == 0:
        seen = set()
        for _ in range(P - 1):
            box = torch.zeros(1, dtype=torch.int64)
            req = comm.irecv(box, tag=100).wait()  # any source, one tag
            assert req.source == int(box), "status source matches the payload"
            seen.add(int(box))
        assert seen == set(range(1, P))
    else:
        comm.isend(torch.tensor([me]), 0, tag=100).wait()
    # wildcard tag as well as wildcard source
    if me == 0 and P > 1:
        box = torch.zeros(1, dtype=torch.int64)
        req = comm.irecv(box, T.ANY_SOURCE, T.ANY_TAG).wait()
        assert req.source == 1 and int(box) == 41
    elif me == 1:
        comm.isend(torch.tensor([41]), 0, tag=77).wait()
    comm.barrier()
    # a short message into a larger buffer reports its true size
    big = torch.zeros(10)
    reqs = [comm.irecv(big, left, tag=3), comm.isend(torch.ones(4), right, tag=3)]
    T.wait_all(reqs)
    assert reqs[0].nbytes == 16 and big[:4].eq(1).all() and big[4:].eq(0).all()
    # test() polls to completion
    box = torch.zeros(2)
    r = comm.irecv(box, left, tag=11)
    comm.isend(torch.ones(2), right, tag=11).wait()
    while not r.test():
        pass
    assert r.done and box.eq(1).all()


def _bad_peer_worker() -> None:
    from commrt import transports as T

    comm = T.world()
    for bad in (-5, comm.size, comm.size + 3):
        try:
            comm.isend(torch.zeros(1), bad)
        except ValueError as e:
            assert "out of range" in str(e)
        else:
            raise AssertionError(f"destination {bad} accepted")


@pytest.mark.parametrize("nprocs", [1, 2, 3, 5])
def test_p2p_transport_ring(nprocs):
    run_ranks(_ring_worker, nprocs, seed=__import__("random").randrange(1 << 20))


def test_p2p_transport_rejects_bad_peer():
    run_ranks(_bad_peer_worker, 2)


def test_oversubscribed_from_launcher_env():
    """Waits poll with yields when the node has more ranks than cores: the launcher's local
    rank count (MPICH, Open MPI, Slurm, torchrun) against the cores; unknown counts as
    oversubscribed."""
    from commrt.transports import oversubscribed

    assert not oversubscribed({"MPI_LOCALNRANKS": "2"}, cores=2)
    assert oversubscribed({"MPI_LOCALNRANKS": "4"}, cores=2)
    assert oversubscribed({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, cores=2)
    assert not oversubscribed({"LOCAL_WORLD_SIZE": "8"}, cores=16)
    assert oversubscribed({}, cores=64)
    assert oversubscribed({"MPI_LOCALNRANKS": "two"}, cores=64)
