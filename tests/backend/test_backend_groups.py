"""Groups on the `commrt` backend: new_group on arbitrary subsets (members-only creation
too), collectives and point-to-point inside them with global/group ranks, the transport
Communicator behind a group (`for_group`), and wire-byte accounting through the backend."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from _backend_util import assert_close, init_commrt, rank_input
from mpi_harness import run_ranks


def _groups_worker(seed: int) -> None:
    init_commrt()
    from commrt import transports as T
    from commrt.backend import CommrtProcessGroup

    rank, P = dist.get_rank(), dist.get_world_size()
    world_comm = T.for_group(dist.group.WORLD)
    if world_comm.size != P or world_comm.rank != rank:
        raise AssertionError(f"for_group(WORLD) gave {world_comm}")
    if dist.get_backend() != "commrt" or not isinstance(dist.group.WORLD, CommrtProcessGroup):
        raise AssertionError(f"default group is {dist.get_backend()} {dist.group.WORLD}")

    subsets = [[0], list(range(1, P)) or [0], list(range(P - 1, -1, -2)),
               [r for r in range(P) if r % 3 != 1]]
    groups = [dist.new_group(ranks) for ranks in subsets]  # every rank creates every group
    for ranks, group in zip(subsets, groups):
        members = sorted(set(ranks))
        if rank not in members:
            if group != dist.GroupMember.NON_GROUP_MEMBER:
                raise AssertionError(f"non-member got a group for {members}")
            continue
        g = dist.get_group_rank(group, rank)
        if g != members.index(rank) or dist.get_world_size(group) != len(members):
            raise AssertionError(f"group {members}: rank {g} of {dist.get_world_size(group)}")
        if dist.get_backend(group) != "commrt" or T.for_group(group).size != len(members):
            raise AssertionError(f"group {members} backend {dist.get_backend(group)}")
        case = f"g{members}"
        ins = [rank_input(seed, r, case, (5,), torch.float32) for r in members]
        t = ins[g].clone()
        dist.all_reduce(t, group=group)
        assert_close(t, torch.stack([x.double() for x in ins]).sum(0).float(), f"{case} all_reduce")
        outs = [torch.empty(5) for _ in members]
        dist.all_gather(outs, ins[g], group=group)
        for i, o in enumerate(outs):
            assert_close(o, ins[i], f"{case} all_gather")
        # broadcast from the group's last member, named by its global rank
        b = ins[g].clone()
        dist.broadcast(b, src=members[-1], group=group)
        assert_close(b, ins[-1], f"{case} broadcast")
        b2 = ins[g].clone()
        dist.broadcast(b2, group_src=0, group=group)
        assert_close(b2, ins[0], f"{case} broadcast group_src")
        objs = [None] * len(members)
        dist.all_gather_object(objs, rank, group=group)
        if objs != members:
            raise AssertionError(f"{case} all_gather_object {objs}")
        # point-to-point inside the group, to the next member by global rank
        if len(members) > 1:
            nxt, prv = members[(g + 1) % len(members)], members[(g - 1) % len(members)]
            got = torch.empty(2)
            reqs = [dist.isend(torch.full((2,), float(rank)), dst=nxt, group=group),
                    dist.irecv(got, src=prv, group=group)]
            for w in reqs:
                w.wait()
            assert_close(got, torch.full((2,), float(prv)), f"{case} p2p")
        dist.barrier(group=group)

    # a group created by its members only (use_local_synchronization)
    if P >= 2 and rank < 2:
        pair = dist.new_group([0, 1], use_local_synchronization=True)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=pair)
        assert_close(t, torch.tensor([3.0]), "members-only group")

    # wire bytes of backend collectives follow the transport's formulas
    B = 1024 * 4
    before = T.wire.snapshot()
    dist.all_reduce(torch.ones(1024))
    dist.all_gather_into_tensor(torch.empty(1024 * P), torch.ones(1024))
    delta = T.snapshot_delta(T.wire.snapshot(), before)
    want_ar = 2 * (P - 1) * B // P
    want_ag = (P - 1) * (B * P) // P
    if delta.get("all_reduce", (0, 0))[0] != want_ar or delta.get("all_gather", (0, 0))[0] != want_ag:
        raise AssertionError(f"wire bytes {delta}, expected all_reduce {want_ar}, "
                             f"all_gather {want_ag}")
    # torch routes dist.monitored_barrier to gloo only; the group's own method works
    dist.group.WORLD.monitored_barrier(timedelta(seconds=60))
    dist.destroy_process_group()


@pytest.mark.parametrize("nprocs", [1, 3, 4, 5])
def test_backend_groups(nprocs: int) -> None:
    run_ranks(_groups_worker, nprocs, timeout=180, seed=random.randrange(1 << 30))
