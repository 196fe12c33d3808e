"""The 2-D hybrid mesh (commrt.optim.HybridMesh), each property a check of one 6-rank launch:
shard and replication groups from ranks_per_node or MPI shared memory, a clear error when
ranks_per_node does not divide the world, the mesh's group check, and the torch DeviceMesh
over the same ranks."""
from __future__ import annotations

import pytest
from harness import assert_check, checks_fixture, run_checks

CHECKS = ["groups_from_ranks_per_node", "ranks_per_node_must_divide",
          "nodes_from_shared_memory", "group_must_match_mesh", "torch_device_mesh"]


def _members(comm, world_rank: int) -> list[int]:
    return comm.allgather_object(world_rank)


def _check_groups_from_ranks_per_node(world) -> None:
    from commrt.optim import HybridMesh

    P, rank = world.size, world.rank
    for rpn in [d for d in range(1, P + 1) if P % d == 0]:
        mesh = HybridMesh(ranks_per_node=rpn)
        assert (mesh.num_nodes, mesh.ranks_per_node) == (P // rpn, rpn)
        assert (mesh.node_index, mesh.shard_index) == (rank // rpn, rank % rpn)
        assert _members(mesh.shard, rank) == [mesh.node_index * rpn + j for j in range(rpn)]
        assert _members(mesh.replicate, rank) == [n * rpn + mesh.shard_index
                                                  for n in range(P // rpn)]
        assert mesh.layout == [[n * rpn + j for j in range(rpn)] for n in range(P // rpn)]


def _check_ranks_per_node_must_divide(world) -> None:
    from commrt.optim import HybridMesh

    P = world.size
    for bad in [d for d in range(2, P + 2) if P % d != 0][:2]:
        with pytest.raises(ValueError, match="does not divide the world size"):
            HybridMesh(ranks_per_node=bad)


def _check_nodes_from_shared_memory(world) -> None:
    from commrt.optim import HybridMesh

    # this job runs on one machine, so one node of P ranks
    mesh = HybridMesh()
    P = world.size
    assert (mesh.num_nodes, mesh.ranks_per_node, mesh.shard.size, mesh.replicate.size) == \
        (1, P, P, 1)


def _check_group_must_match_mesh(world) -> None:
    from commrt import transports as T
    from commrt.optim import HybridMesh
    from commrt.optim.mesh import resolve_mesh

    # a group other than the mesh's is refused; a duplicate of it is accepted
    mesh = HybridMesh(ranks_per_node=1)
    assert resolve_mesh(mesh, None, T.Communicator(world.mpi.Dup())) is mesh
    half = world.split(world.rank % 2)
    with pytest.raises(ValueError, match="does not match the mesh"):
        resolve_mesh(mesh, None, half)


def _check_torch_device_mesh(world) -> None:
    import socket

    import torch
    import torch.distributed as dist

    from commrt.optim import HybridMesh

    P, rank = world.size, world.rank
    mesh = HybridMesh(ranks_per_node=1)
    # the torch DeviceMesh needs torch.distributed; then its groups are the same ranks
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        mesh.device_mesh()
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast_object(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=P)
    try:
        mesh = HybridMesh(ranks_per_node=2 if P % 2 == 0 else 1)
        dm = mesh.device_mesh()
        assert dm.mesh_dim_names == ("replicate", "shard")
        assert dist.get_process_group_ranks(mesh.shard_process_group()) == mesh.layout[
            mesh.node_index]
        assert dist.get_process_group_ranks(mesh.replicate_process_group()) == [
            row[mesh.shard_index] for row in mesh.layout]
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mesh.shard_process_group())
        assert t.item() == sum(mesh.layout[mesh.node_index])
    finally:
        dist.destroy_process_group()


def _mesh_worker(seed: int) -> None:
    from commrt import transports as T

    world = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, world, rank=world.rank)


launch = checks_fixture(_mesh_worker, [6], timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_optim_mesh(launch, check):
    assert_check(launch, check)
