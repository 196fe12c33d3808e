"""Sub-communicators: split by color and explicit subgroups, on odd world sizes too."""
import pytest
import torch
from mpi_harness import run_ranks


def _groups_worker() -> None:
    from commrt import transports as T

    comm = T.world()
    P, me = comm.size, comm.rank
    # split into evens and odds, reversed order inside each
    sub = comm.split(me % 2, key=-me)
    members = [r for r in range(P) if r % 2 == me % 2]
    assert sub.size == len(members)
    assert sub.rank == sorted(members, reverse=True).index(me)
    t = torch.tensor([float(me)])
    sub.iallreduce(t).wait()
    assert float(t) == sum(members)
    # color None drops out
    dropped = comm.split(None if me == 0 else 1)
    assert (dropped is None) == (me == 0)
    # explicit subgroup of the last ranks, in a given order
    chosen = list(range(P - 1, max(P - 3, -1), -1))
    g = comm.subgroup(chosen)
    if me in chosen:
        assert g.rank == chosen.index(me) and g.size == len(chosen)
        box = torch.tensor([float(me)])
        g.ibroadcast(box, 0).wait()
        assert float(box) == chosen[0]
    else:
        assert g is None
    # for_group passes communicators through and defaults to the world
    assert T.for_group(sub) is sub and T.for_group(None) is comm


@pytest.mark.parametrize("nprocs", [1, 3, 4, 5])
def test_transport_groups(nprocs):
    run_ranks(_groups_worker, nprocs)
