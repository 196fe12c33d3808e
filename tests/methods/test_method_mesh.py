"""The 2-D hybrid mesh (commrt.optim.HybridMesh): shard and replication groups from
ranks_per_node or MPI shared memory, a clear error when ranks_per_node does not divide the
world, the torch DeviceMesh over the same ranks."""
from __future__ import annotations

import pytest
from harness import run_ranks


def _members(comm, world_rank: int) -> list[int]:
    return comm.allgather_object(world_rank)


def _mesh_worker() -> None:
    import torch
    import torch.distributed as dist

    from commrt import transports as T
    from commrt.optim import HybridMesh
    from commrt.optim.mesh import resolve_mesh

    world = T.world()
    P, rank = world.size, world.rank
    for rpn in [d for d in range(1, P + 1) if P % d == 0]:
        mesh = HybridMesh(ranks_per_node=rpn)
        assert (mesh.num_nodes, mesh.ranks_per_node) == (P // rpn, rpn)
        assert (mesh.node_index, mesh.shard_index) == (rank // rpn, rank % rpn)
        assert _members(mesh.shard, rank) == [mesh.node_index * rpn + j for j in range(rpn)]
        assert _members(mesh.replicate, rank) == [n * rpn + mesh.shard_index
                                                  for n in range(P // rpn)]
        assert mesh.layout == [[n * rpn + j for j in range(rpn)] for n in range(P // rpn)]
    for bad in [d for d in range(2, P + 2) if P % d != 0][:2]:
        try:
            HybridMesh(ranks_per_node=bad)
        except ValueError as exc:
            assert "does not divide the world size" in str(exc), exc
        else:
            raise AssertionError(f"ranks_per_node={bad} accepted on {P} ranks")

    # nodes from MPI shared memory: this job runs on one machine, so one node of P ranks
    mesh = HybridMesh()
    assert (mesh.num_nodes, mesh.ranks_per_node, mesh.shard.size, mesh.replicate.size) == \
        (1, P, P, 1)

    # a group other than the mesh's is refused; a duplicate of it is accepted
    mesh = HybridMesh(ranks_per_node=1)
    assert resolve_mesh(mesh, None, T.Communicator(world.mpi.Dup())) is mesh
    if P > 1:
        half = world.split(rank % 2)
        try:
            resolve_mesh(mesh, None, half)
        except ValueError as exc:
            assert "does not match the mesh" in str(exc)
        else:
            raise AssertionError("a half-world group accepted for a full mesh")

    # the torch DeviceMesh: needs torch.distributed; then its groups are the same ranks
    try:
        mesh.device_mesh()
    except RuntimeError as exc:
        assert "needs torch.distributed" in str(exc)
    else:
        raise AssertionError("device_mesh without torch.distributed")
    import socket
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast_object(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=P)
    try:
        rpn = 2 if P % 2 == 0 else 1
        mesh = HybridMesh(ranks_per_node=rpn)
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


@pytest.mark.parametrize("nprocs", [6])
def test_optim_mesh_groups(nprocs):
    run_ranks(_mesh_worker, nprocs, timeout=240)
