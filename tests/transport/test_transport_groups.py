"""Sub-communicators: split by color and explicit subgroups, on odd world sizes too.

One launch per world size runs every check below; each rank prints ``CHECK <name> rank
<r> OK|FAIL`` and one pytest test per (world size, check) reads it."""
import pytest
import torch
from harness import assert_check, checks_fixture, run_checks

WORLD_SIZES = [1, 3, 4, 5]


def _check_split(comm):
    """Split into evens and odds, reversed order inside each; reduce inside the halves."""
    P, me = comm.size, comm.rank
    sub = comm.split(me % 2, key=-me)
    members = [r for r in range(P) if r % 2 == me % 2]
    assert sub.size == len(members)
    assert sub.rank == sorted(members, reverse=True).index(me)
    t = torch.tensor([float(me)])
    sub.iallreduce(t).wait()
    assert float(t) == sum(members)


def _check_split_none(comm):
    """Color None drops out."""
    dropped = comm.split(None if comm.rank == 0 else 1)
    assert (dropped is None) == (comm.rank == 0)


def _check_subgroup(comm):
    """An explicit subgroup of the last ranks, in a given order."""
    P, me = comm.size, comm.rank
    chosen = list(range(P - 1, max(P - 3, -1), -1))
    g = comm.subgroup(chosen)
    if me in chosen:
        assert g.rank == chosen.index(me) and g.size == len(chosen)
        box = torch.tensor([float(me)])
        g.ibroadcast(box, 0).wait()
        assert float(box) == chosen[0]
    else:
        assert g is None


def _check_for_group(comm):
    """for_group passes communicators through and defaults to the world."""
    from commrt import transports as T

    sub = comm.split(comm.rank % 2)
    assert T.for_group(sub) is sub and T.for_group(None) is comm


CHECKS = {"split": _check_split, "split_none": _check_split_none,
          "subgroup": _check_subgroup, "for_group": _check_for_group}


def _groups_worker(seed: int) -> None:
    """Deterministic inputs (ranks): `seed` is unused."""
    from commrt import transports as T

    comm = T.world()
    run_checks(CHECKS, comm, rank=comm.rank)


launch = checks_fixture(_groups_worker, WORLD_SIZES, timeout=180)


@pytest.mark.parametrize("check", CHECKS)
def test_transport_groups(launch, check):
    assert_check(launch, check)
