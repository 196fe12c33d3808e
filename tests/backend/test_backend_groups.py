"""Groups on the `commrt` backend: new_group on arbitrary subsets (members-only creation
too), collectives and point-to-point inside them with global/group ranks, the transport
Communicator behind a group (`for_group`), and wire-byte accounting through the backend.

One launch per world size runs every check below; each rank prints ``CHECK <name> rank
<r> OK|FAIL`` and one pytest test per (world size, check) reads it. Inputs are fresh per
launch (`rank_input` from the launch's seed, printed on failure)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from backend_util import assert_close, init_commrt, rank_input
from harness import assert_check, checks_fixture, run_checks

WORLD_SIZES = [1, 3, 4, 5]


def _subsets(P: int) -> list[list[int]]:
    """Ranks of the groups every check uses: a single rank, all but rank 0, every other
    rank from the top (unsorted), and the ranks r with r % 3 != 1."""
    return [[0], list(range(1, P)) or [0], list(range(P - 1, -1, -2)),
            [r for r in range(P) if r % 3 != 1]]


def _member_groups(groups):
    """(sorted members, group, this rank's group rank, the case's name) for each group this
    rank belongs to."""
    rank = dist.get_rank()
    for ranks, group in groups:
        members = sorted(set(ranks))
        if rank in members:
            yield members, group, dist.get_group_rank(group, rank), f"g{members}"


def _check_world(seed, groups):
    """The default group is commrt's, and its transport Communicator matches it."""
    from commrt import transports as T
    from commrt.backend import CommrtProcessGroup

    rank, P = dist.get_rank(), dist.get_world_size()
    world_comm = T.for_group(dist.group.WORLD)
    assert world_comm.size == P and world_comm.rank == rank, f"for_group(WORLD) gave {world_comm}"
    assert dist.get_backend() == "commrt" and isinstance(dist.group.WORLD, CommrtProcessGroup), \
        f"default group is {dist.get_backend()} {dist.group.WORLD}"


def _check_membership(seed, groups):
    """Non-members get NON_GROUP_MEMBER; members their group rank, size, backend and a
    transport Communicator of the group's size."""
    from commrt import transports as T

    rank = dist.get_rank()
    for ranks, group in groups:
        members = sorted(set(ranks))
        if rank not in members:
            assert group == dist.GroupMember.NON_GROUP_MEMBER, \
                f"non-member got a group for {members}"
            continue
        g = dist.get_group_rank(group, rank)
        assert g == members.index(rank) and dist.get_world_size(group) == len(members), \
            f"group {members}: rank {g} of {dist.get_world_size(group)}"
        assert dist.get_backend(group) == "commrt" and T.for_group(group).size == len(members), \
            f"group {members} backend {dist.get_backend(group)}"


def _check_all_reduce(seed, groups):
    for members, group, g, case in _member_groups(groups):
        ins = [rank_input(seed, r, case, (5,), torch.float32) for r in members]
        t = ins[g].clone()
        dist.all_reduce(t, group=group)
        assert_close(t, torch.stack([x.double() for x in ins]).sum(0).float(),
                     f"{case} all_reduce")


def _check_all_gather(seed, groups):
    for members, group, g, case in _member_groups(groups):
        ins = [rank_input(seed, r, case, (5,), torch.float32) for r in members]
        outs = [torch.empty(5) for _ in members]
        dist.all_gather(outs, ins[g], group=group)
        for i, o in enumerate(outs):
            assert_close(o, ins[i], f"{case} all_gather")


def _check_broadcast(seed, groups):
    """From the group's last member named by its global rank, and by group_src=0."""
    for members, group, g, case in _member_groups(groups):
        ins = [rank_input(seed, r, f"bc{case}", (5,), torch.float32) for r in members]
        b = ins[g].clone()
        dist.broadcast(b, src=members[-1], group=group)
        assert_close(b, ins[-1], f"{case} broadcast")
        b2 = ins[g].clone()
        dist.broadcast(b2, group_src=0, group=group)
        assert_close(b2, ins[0], f"{case} broadcast group_src")


def _check_all_gather_object(seed, groups):
    for members, group, _, case in _member_groups(groups):
        objs = [None] * len(members)
        dist.all_gather_object(objs, dist.get_rank(), group=group)
        assert objs == members, f"{case} all_gather_object {objs}"


def _check_p2p(seed, groups):
    """isend/irecv inside the group, to the next member by global rank."""
    rank = dist.get_rank()
    for members, group, g, case in _member_groups(groups):
        if len(members) > 1:
            nxt, prv = members[(g + 1) % len(members)], members[(g - 1) % len(members)]
            got = torch.empty(2)
            reqs = [dist.isend(torch.full((2,), float(rank)), dst=nxt, group=group),
                    dist.irecv(got, src=prv, group=group)]
            for w in reqs:
                w.wait()
            assert_close(got, torch.full((2,), float(prv)), f"{case} p2p")
        dist.barrier(group=group)


def _check_members_only(seed, groups):
    """A group created by its members only (use_local_synchronization)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    if P >= 2 and rank < 2:
        pair = dist.new_group([0, 1], use_local_synchronization=True)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=pair)
        assert_close(t, torch.tensor([3.0]), "members-only group")


def _check_wire_bytes(seed, groups):
    """Wire bytes of backend collectives follow the transport's formulas."""
    from commrt import transports as T

    P = dist.get_world_size()
    B = 1024 * 4
    before = T.wire.snapshot()
    dist.all_reduce(torch.ones(1024))
    dist.all_gather_into_tensor(torch.empty(1024 * P), torch.ones(1024))
    delta = T.snapshot_delta(T.wire.snapshot(), before)
    want_ar = 2 * (P - 1) * B // P
    want_ag = (P - 1) * (B * P) // P
    assert delta.get("all_reduce", (0, 0))[0] == want_ar and \
        delta.get("all_gather", (0, 0))[0] == want_ag, \
        f"wire bytes {delta}, expected all_reduce {want_ar}, all_gather {want_ag}"


def _check_monitored_barrier(seed, groups):
    """torch routes dist.monitored_barrier to gloo only; the group's own method works."""
    dist.group.WORLD.monitored_barrier(timedelta(seconds=60))


CHECKS = {"world": _check_world, "membership": _check_membership,
          "all_reduce": _check_all_reduce, "all_gather": _check_all_gather,
          "broadcast": _check_broadcast, "all_gather_object": _check_all_gather_object,
          "p2p": _check_p2p, "members_only": _check_members_only,
          "wire_bytes": _check_wire_bytes, "monitored_barrier": _check_monitored_barrier}


def _groups_worker(seed: int) -> None:
    init_commrt()
    subsets = _subsets(dist.get_world_size())
    groups = [(ranks, dist.new_group(ranks)) for ranks in subsets]  # every rank makes each
    run_checks(CHECKS, seed, groups, rank=dist.get_rank())
    dist.destroy_process_group()


launch = checks_fixture(_groups_worker, WORLD_SIZES, timeout=180)


@pytest.mark.parametrize("check", CHECKS)
def test_backend_group(launch, check):
    assert_check(launch, check)
