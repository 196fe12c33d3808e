"""The 2-D hybrid mesh of FlexDeMo and EDiT: a shard group inside a node, a replication
group across nodes.

World ranks are laid out as ``nodes × ranks_per_node``. The *shard group* of a rank holds
the ranks of its node (fast links: shared memory / NVLink); the *replication group* holds
one rank per node, the ranks with the same shard index (slow links). Methods on this mesh
keep per-step traffic inside the shard group and send only compressed or infrequent
traffic over the replication group, so inter-node bytes grow with the number of nodes, not
with the number of accelerators.

Nodes come from MPI (ranks that share memory, ``MPI_Comm_split_type(COMM_TYPE_SHARED)``)
or, to emulate several nodes on one machine, from ``ranks_per_node``: world rank ``r`` is
then on node ``r // ranks_per_node`` with shard index ``r % ranks_per_node``.

Both groups are exposed as `commrt.transports` Communicators (``mesh.shard``,
``mesh.replicate``) and, when ``torch.distributed`` is initialised (the ``commrt`` backend,
for FSDP2), as a torch ``DeviceMesh`` with dimensions ``("replicate", "shard")`` whose
``["shard"]`` sub-mesh is what ``fully_shard(module, mesh=...)`` takes.
"""
from __future__ import annotations

from typing import Any

import torch

from commrt import transports as T


class HybridMesh:
    """A ``nodes × ranks_per_node`` mesh over a communicator.

    Args:
        group: the communicator spanning the mesh: None (world), a `commrt.transports`
            Communicator, or a torch ProcessGroup (resolved with ``transports.for_group``).
        ranks_per_node: emulate nodes of this many consecutive ranks; None detects nodes
            from MPI shared memory. Must divide the world size.

    Attributes: ``world``, ``shard``, ``replicate`` (Communicators), ``num_nodes``,
    ``ranks_per_node``, ``node_index`` (this rank's node), ``shard_index`` (its rank inside
    the node = its replication-group id).

    Collective: every rank of ``group`` must construct the mesh with the same arguments.
    """

    def __init__(self, group: Any = None, ranks_per_node: int | None = None):
        self.world = T.for_group(group)
        size = self.world.size
        if ranks_per_node is not None:
            if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
                raise ValueError(f"ranks_per_node must be a positive int, got {ranks_per_node!r}")
            if size % ranks_per_node != 0:
                raise ValueError(
                    f"ranks_per_node={ranks_per_node} does not divide the world size {size}: "
                    f"every node must hold the same number of ranks")
            self.world.check_uniform([ranks_per_node], "ranks_per_node")
            node_index = self.world.rank // ranks_per_node
            shard_index = self.world.rank % ranks_per_node
            self.ranks_per_node = ranks_per_node
            self.num_nodes = size // ranks_per_node
        else:
            node_index, shard_index = self._detect_nodes()
        self.node_index = node_index
        self.shard_index = shard_index
        self.shard = self.world.split(node_index, key=shard_index)
        self.replicate = self.world.split(shard_index, key=node_index)
        if self.shard.size != self.ranks_per_node or self.replicate.size != self.num_nodes:
            raise RuntimeError(
                f"mesh split produced groups of sizes {self.shard.size}×{self.replicate.size}, "
                f"expected {self.ranks_per_node}×{self.num_nodes}")
        # world rank of (node, shard index), for torch process groups / DeviceMesh.
        layout = self.world.allgather_object((node_index, shard_index, self.world.rank))
        self.layout = [[0] * self.ranks_per_node for _ in range(self.num_nodes)]
        for node, shard, rank in layout:
            self.layout[node][shard] = rank
        self._device_mesh = None

    def _detect_nodes(self) -> tuple[int, int]:
        local = self.world.split_shared_memory()
        try:
            local_rank, local_size = local.rank, local.size
            leader = local.bcast_object(self.world.rank, 0)
        finally:
            local.free()
        info = self.world.allgather_object((leader, local_size))
        sizes = {s for _, s in info}
        if len(sizes) != 1:
            raise ValueError(
                f"nodes hold different numbers of ranks ({sorted(sizes)}): the hybrid mesh "
                f"needs the same count on every node (or pass ranks_per_node)")
        leaders = sorted({l for l, _ in info})
        self.ranks_per_node = local_size
        self.num_nodes = len(leaders)
        return leaders.index(leader), local_rank

    @property
    def size(self) -> int:
        return self.world.size

    def device_mesh(self, device_type: str = "cpu"):
        """The torch ``DeviceMesh`` (dims ``("replicate", "shard")``) over the same ranks.

        Needs ``torch.distributed`` initialised over exactly the ranks of this mesh (world
        ranks equal to the mesh's ranks). Collective on first call; cached.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        if self._device_mesh is not None:
            return self._device_mesh
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("HybridMesh.device_mesh() needs torch.distributed initialised "
                               "(dist.init_process_group('commrt') under mpirun)")
        if dist.get_world_size() != self.size or dist.get_rank() != self.world.rank:
            raise ValueError(
                f"torch.distributed world (rank {dist.get_rank()} of {dist.get_world_size()}) "
                f"does not match the mesh (rank {self.world.rank} of {self.size})")
        self._device_mesh = DeviceMesh(device_type, torch.tensor(self.layout),
                                       mesh_dim_names=("replicate", "shard"))
        return self._device_mesh

    def shard_process_group(self):
        """torch ProcessGroup of this rank's shard group (see `device_mesh`)."""
        return self.device_mesh().get_group("shard")

    def replicate_process_group(self):
        """torch ProcessGroup of this rank's replication group (see `device_mesh`)."""
        return self.device_mesh().get_group("replicate")

    def __repr__(self) -> str:
        return (f"HybridMesh(nodes={self.num_nodes}, ranks_per_node={self.ranks_per_node}, "
                f"node={self.node_index}, shard_index={self.shard_index})")


def resolve_mesh(mesh: HybridMesh | None, ranks_per_node: int | None,
                 process_group: Any) -> HybridMesh:
    """The mesh a method runs on: ``mesh`` if given (checked against ``process_group``),
    else a new one over ``process_group`` with ``ranks_per_node``.

    Raises ValueError when ``process_group`` does not span the same ranks as ``mesh``.
    """
    if mesh is None:
        return HybridMesh(process_group, ranks_per_node=ranks_per_node)
    if ranks_per_node is not None and ranks_per_node != mesh.ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} contradicts the mesh's "
                         f"{mesh.ranks_per_node} ranks per node")
    if process_group is not None:
        comm = T.for_group(process_group)
        same = comm.size == mesh.size and comm.rank == mesh.world.rank
        if same and isinstance(comm, T.Communicator) and isinstance(mesh.world, T.Communicator):
            # congruent: the same ranks in the same order (a dup of the mesh's communicator)
            same = comm.congruent(mesh.world)
        if not same:
            raise ValueError(
                f"process_group (rank {comm.rank} of {comm.size}) does not match the mesh "
                f"(rank {mesh.world.rank} of {mesh.size}): pass the group the mesh was built on")
    return mesh
