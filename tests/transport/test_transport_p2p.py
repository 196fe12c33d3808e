"""Transport point-to-point: tagged and wildcard receives, every dtype, exact wire bytes.

One launch per world size runs every check below; each rank prints ``CHECK <name> rank
<r> OK|FAIL`` and one pytest test per (world size, check) reads it. Inputs are fresh per
launch (its seed is printed on failure)."""
import pytest
import torch
from harness import assert_check, checks_fixture, generator, run_checks

WORLD_SIZES = [1, 2, 3, 5]


def _neighbours(comm) -> tuple[int, int]:
    """(right, left) around the ring."""
    return (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size


def _check_ring_dtypes(comm, seed):
    """Each rank sends 513 elements of every dtype to its right neighbour: the bytes
    arrive exactly, the request reports source and size, the counters count them."""
    from commrt import transports as T

    right, left = _neighbours(comm)
    T.wire.reset()
    sent = 0
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                  torch.int8, torch.uint8, torch.bool):
        expected = (torch.randn(513, generator=generator(seed, "ring", left)) * 10).to(dtype)
        mine = (torch.randn(513, generator=generator(seed, "ring", comm.rank)) * 10).to(dtype)
        inbox = torch.empty(513, dtype=dtype)
        reqs = [comm.irecv(inbox, left, tag=5), comm.isend(mine, right, tag=5)]
        T.wait_all(reqs)
        assert torch.equal(inbox, expected), f"ring exchange of {dtype}"
        assert reqs[0].source == left and reqs[0].nbytes == mine.numel() * mine.element_size()
        sent += mine.numel() * mine.element_size()
    assert T.wire.bytes("send") == sent and T.wire.messages("send") == 8


def _check_noncontiguous(comm, seed):
    from commrt import transports as T

    right, left = _neighbours(comm)
    src = torch.randn(4, 5, generator=generator(seed, "strided", comm.rank)).t()  # transposed
    expected = torch.randn(4, 5, generator=generator(seed, "strided", left)).t()
    dst = torch.zeros(4, 5).t()  # same logical shape as src, other strides
    T.wait_all([comm.irecv(dst, left, tag=9), comm.isend(src, right, tag=9)])
    assert torch.equal(dst, expected)


def _check_tags(comm, seed):
    """Tags keep messages apart even when received in the opposite order."""
    from commrt import transports as T

    right, left = _neighbours(comm)
    a, b = torch.zeros(3), torch.zeros(3)
    reqs = [comm.isend(torch.full((3,), 1.0), right, tag=1),
            comm.isend(torch.full((3,), 2.0), right, tag=2)]
    comm.irecv(b, left, tag=2).wait()
    comm.irecv(a, left, tag=1).wait()
    T.wait_all(reqs)
    assert a.eq(1).all() and b.eq(2).all()


def _check_any_source(comm, seed):
    """Everyone sends its rank to rank 0, which learns who sent what."""
    if comm.rank == 0:
        seen = set()
        for _ in range(comm.size - 1):
            box = torch.zeros(1, dtype=torch.int64)
            req = comm.irecv(box, tag=100).wait()  # any source, one tag
            assert req.source == int(box), "status source matches the payload"
            seen.add(int(box))
        assert seen == set(range(1, comm.size))
    else:
        comm.isend(torch.tensor([comm.rank]), 0, tag=100).wait()


def _check_any_tag(comm, seed):
    """Wildcard tag as well as wildcard source."""
    from commrt import transports as T

    if comm.rank == 0 and comm.size > 1:
        box = torch.zeros(1, dtype=torch.int64)
        req = comm.irecv(box, T.ANY_SOURCE, T.ANY_TAG).wait()
        assert req.source == 1 and int(box) == 41
    elif comm.rank == 1:
        comm.isend(torch.tensor([41]), 0, tag=77).wait()
    comm.barrier()


def _check_short_message(comm, seed):
    """A short message into a larger buffer reports its true size."""
    from commrt import transports as T

    right, left = _neighbours(comm)
    big = torch.zeros(10)
    reqs = [comm.irecv(big, left, tag=3), comm.isend(torch.ones(4), right, tag=3)]
    T.wait_all(reqs)
    assert reqs[0].nbytes == 16 and big[:4].eq(1).all() and big[4:].eq(0).all()


def _check_test_polls(comm, seed):
    """test() polls a receive to completion."""
    right, left = _neighbours(comm)
    box = torch.zeros(2)
    r = comm.irecv(box, left, tag=11)
    comm.isend(torch.ones(2), right, tag=11).wait()
    while not r.test():
        pass
    assert r.done and box.eq(1).all()


def _check_bad_peer(comm, seed):
    """A destination outside the communicator is a ValueError, nothing is posted."""
    for bad in (-5, comm.size, comm.size + 3):
        with pytest.raises(ValueError, match="out of range"):
            comm.isend(torch.zeros(1), bad)


CHECKS = {"ring_dtypes": _check_ring_dtypes, "noncontiguous": _check_noncontiguous,
          "tags": _check_tags, "any_source": _check_any_source, "any_tag": _check_any_tag,
          "short_message": _check_short_message, "test_polls": _check_test_polls,
          "bad_peer": _check_bad_peer}


def _p2p_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks(CHECKS, comm, seed, rank=comm.rank)


launch = checks_fixture(_p2p_worker, WORLD_SIZES, timeout=180)


@pytest.mark.parametrize("check", CHECKS)
def test_transport_p2p(launch, check):
    assert_check(launch, check)


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
