"""FlexDeMo (commrt.optim.FlexDeMo), manual flat shards, under mpirun, one launch per world
size; each rank prints ``CHECK <name> rank <r> OK|FAIL`` and each check is its own test:

- one_node_is_demo: one node of P ranks equals DeMo on this rank's flat shard with the mean
  gradient;
- lossless_is_sgd: several nodes, top-k = chunk, base sgd: SGD at lr² on the global mean
  gradient (float64 reference);
- replicas_and_wire_bytes: sign and AdamW bases, 8-bit values: parameters identical on every
  rank after every step, wire bytes per kind match the docstring formula;
- foreign_group_refused: a process group that is not the mesh's is refused.
FSDP2 (DTensor parameters) on commrt and gloo is tested below.
"""
from __future__ import annotations

import math

import pytest
import torch
from harness import assert_check, checks_fixture, run_checks, run_ranks

SHAPES = [(6, 10), (10,), (3, 5, 2), (1,)]
LR, CHUNK = 0.05, 8


def _dyadic_grad(seed: int, rank: int, step: int, shape) -> torch.Tensor:
    """Gradients whose sums over ranks are exact in float32 (so reference and optimizer see
    bit-identical mean gradients whatever the reduction order)."""
    g = torch.Generator().manual_seed(seed * 7919 + rank * 131 + step * 13 + len(shape))
    return torch.randint(-64, 65, shape, generator=g).float() / 64


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


WORLD_SIZES = [4, 6]
CHECKS = ["one_node_is_demo", "lossless_is_sgd", "replicas_and_wire_bytes",
          "foreign_group_refused"]
TOTAL = sum(math.prod(s) for s in SHAPES)


def _multi_node_mesh(P: int):
    """2 ranks per node when possible, else one rank per node."""
    from commrt.optim import HybridMesh

    rpn = 2 if P % 2 == 0 and P > 2 else 1
    mesh = HybridMesh(ranks_per_node=rpn)
    assert (mesh.shard.size, mesh.replicate.size) == (rpn, P // rpn)
    return mesh, rpn, P // rpn


def _check_one_node_is_demo(comm, seed: int) -> None:
    from commrt.optim import DeMo, FlexDeMo, HybridMesh

    P, rank, total = comm.size, comm.rank, TOTAL
    mesh = HybridMesh(ranks_per_node=P)
    params = _params(seed)
    opt = FlexDeMo(params, lr=LR, mesh=mesh, base="sign", compression_topk=3,
                   compression_chunk=CHUNK, compression_decay=0.9, weight_decay=0.1)
    per_rank = math.ceil(total / (P * CHUNK)) * CHUNK
    flat0 = torch.zeros(P * per_rank)
    flat0[:total] = _flat(params).float()
    shard = torch.nn.Parameter(flat0[rank * per_rank:(rank + 1) * per_rank].clone())
    myself = comm.split(rank)
    ref = DeMo([shard], lr=LR, compression_topk=3, compression_chunk=CHUNK,
               compression_decay=0.9, weight_decay=0.1, process_group=myself)
    for step in range(4):
        grads = [sum(_dyadic_grad(seed, r, step, s).double() for r in range(P)).float()
                 for s in SHAPES]
        for p, s in zip(params, SHAPES):
            p.grad = _dyadic_grad(seed, rank, step, s)
        opt.step()
        mean = torch.zeros(P * per_rank)
        mean[:total] = _flat(grads).float()
        shard.grad = mean[rank * per_rank:(rank + 1) * per_rank].clone().div_(P)
        ref.step()
        mine = _flat(params)[rank * per_rank:min((rank + 1) * per_rank, total)]
        torch.testing.assert_close(mine, shard.detach().double()[:mine.numel()],
                                   rtol=1e-6, atol=1e-7)
        everyone = comm.allgather_object(_flat(params))
        assert all(torch.equal(x, everyone[0]) for x in everyone), "ranks diverged"


def _check_lossless_is_sgd(comm, seed: int) -> None:
    from commrt.optim import FlexDeMo

    P, rank = comm.size, comm.rank
    mesh, _, _ = _multi_node_mesh(P)
    params = _params(seed + 1)
    ref_p = [p.detach().double().clone() for p in params]
    opt = FlexDeMo(params, lr=LR, mesh=mesh, base="sgd", compression_topk=CHUNK,
                   compression_chunk=CHUNK, compression_decay=0.5)
    for step in range(3):
        for p, s in zip(params, SHAPES):
            p.grad = _dyadic_grad(seed + 1, rank, step, s)
        opt.step()
        for i, s in enumerate(SHAPES):
            g = sum(_dyadic_grad(seed + 1, r, step, s).double() for r in range(P)) / P
            ref_p[i] -= LR * LR * g
            torch.testing.assert_close(params[i].detach().double(), ref_p[i], rtol=1e-5,
                                       atol=1e-6)


def _check_replicas_and_wire_bytes(comm, seed: int) -> None:
    from commrt import transports as T
    from commrt.optim import FlexDeMo

    P, rank, total = comm.size, comm.rank, TOTAL
    mesh, m, R = _multi_node_mesh(P)
    per_rank = math.ceil(total / (m * CHUNK)) * CHUNK
    N = m * per_rank
    for base, value_bits in (("sign", 32), ("adamw", 8)):
        params = _params(seed + 2)
        opt = FlexDeMo(params, lr=LR, mesh=mesh, base=base, compression_topk=3,
                       compression_chunk=CHUNK, value_bits=value_bits, weight_decay=0.01)
        vbytes = 4 if value_bits == 32 else 1
        payload = (per_rank // CHUNK) * 3 * (2 + vbytes) + (
            4 * (per_rank // CHUNK) if value_bits == 8 else 0)
        for step in range(3):
            for p, s in zip(params, SHAPES):
                p.grad = torch.randn(s, generator=torch.Generator().manual_seed(
                    seed * 7919 + rank * 1000 + step))
            before = T.wire.snapshot()
            old = _flat(params)
            opt.step()
            delta = T.snapshot_delta(T.wire.snapshot(), before)
            got = {k: v[0] for k, v in delta.items()}
            want = {}
            if m > 1:
                want["flexdemo.reduce_scatter"] = (m - 1) * 4 * N // m
                want["flexdemo.param_all_gather"] = (m - 1) * 4 * N // m
            if R > 1:
                want["flexdemo.all_gather"] = (R - 1) * payload
            assert got == want, (got, want)
            assert opt.last_step_wire_bytes == sum(want.values())
            assert opt.last_step_inter_node_bytes == want.get("flexdemo.all_gather", 0)
            now = _flat(params)
            everyone = comm.allgather_object(now)
            assert all(torch.equal(x, now) for x in everyone), f"{base}: ranks diverged"
            assert not torch.equal(now, old), "no update"
            if base == "sign":
                moved = (now - old + old * LR * 0.01).abs()
                assert ((moved - LR).abs() < 1e-5).logical_or(moved < 1e-6).all()


def _check_foreign_group_refused(comm, seed: int) -> None:
    from commrt.optim import FlexDeMo

    mesh, _, _ = _multi_node_mesh(comm.size)
    sub = comm.split(0 if comm.rank < comm.size // 2 else 1)
    with pytest.raises(ValueError, match="does not match the mesh"):
        FlexDeMo(_params(seed), lr=LR, mesh=mesh, process_group=sub)


def _flexdemo_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


launch = checks_fixture(_flexdemo_worker, WORLD_SIZES, timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_flexdemo_multi_rank(launch, check):
    assert_check(launch, check)


def test_optim_flexdemo_bad_configuration():
    from commrt.optim import FlexDeMo

    params = [torch.nn.Parameter(torch.zeros(8, 8))]
    with pytest.raises(ValueError, match="exceeds the chunk"):
        FlexDeMo(params, lr=0.1, compression_topk=9, compression_chunk=8)
    with pytest.raises(ValueError, match="base"):
        FlexDeMo(params, lr=0.1, base="lion")


def _init_torch_dist(backend: str) -> None:
    """torch.distributed under mpirun: commrt needs nothing; gloo gets a TCP store whose
    port is agreed over MPI."""
    import socket

    import torch.distributed as dist

    from commrt import transports as T

    if backend == "commrt":
        import commrt.backend

        commrt.backend.register()
        dist.init_process_group("commrt")
        return
    world = T.world()
    port = None
    if world.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast_object(port)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=world.rank,
                            world_size=world.size)


def _flexdemo_fsdp_worker(backend: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from commrt import transports as T
    from commrt.optim import DeMo, FlexDeMo, HybridMesh

    _init_torch_dist(backend)
    comm = T.world()
    P, rank = comm.size, comm.rank
    myself = comm.split(rank)
    try:
        for rpn in (P, 2):
            mesh = HybridMesh(ranks_per_node=rpn)
            R = P // rpn
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 1))
            shard_mesh = mesh.device_mesh()["shard"]
            for layer in (model[0], model[2], model[3]):
                fully_shard(layer, mesh=shard_mesh)
            fully_shard(model, mesh=shard_mesh)
            params = list(model.parameters())
            opt = FlexDeMo(params, lr=LR, mesh=mesh, base="sign", compression_topk=2,
                           compression_chunk=4, compression_decay=0.9, weight_decay=0.1)
            # reference (one node): DeMo on this rank's local shards, zero-padded to chunks
            shards = []
            for p in params:
                n = p.to_local().numel()
                padded = torch.zeros(math.ceil(n / 4) * 4)
                padded[:n] = p.to_local().detach().reshape(-1)
                shards.append(torch.nn.Parameter(padded))
            ref = DeMo(shards, lr=LR, compression_topk=2, compression_chunk=4,
                       compression_decay=0.9, weight_decay=0.1, process_group=myself)
            empty = sum(p.to_local().numel() == 0 for p in params)
            assert comm.mpi.allreduce(empty) > 0, "the test wants an empty shard somewhere"
            gen = torch.Generator().manual_seed(rank)
            for _ in range(3):
                x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 1, generator=gen)
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                for p, s in zip(params, shards):
                    g = torch.zeros_like(s)
                    if p.grad is not None:
                        local = p.grad.to_local().reshape(-1)
                        g[:local.numel()] = local
                    s.grad = g
                before = T.wire.bytes("flexdemo.all_gather")
                opt.step()
                assert T.wire.bytes("flexdemo.all_gather") - before == \
                    opt.last_step_inter_node_bytes
                if R > 1:
                    assert opt.last_step_inter_node_bytes == (R - 1) * opt.payload_bytes() > 0
                else:
                    ref.step()
                    for p, s in zip(params, shards):
                        local = p.to_local().detach().reshape(-1)
                        torch.testing.assert_close(local, s.detach()[:local.numel()],
                                                   rtol=1e-6, atol=1e-7)
                full = torch.cat([p.full_tensor().detach().reshape(-1) for p in params])
                everyone = comm.allgather_object(full)
                assert all(torch.equal(f, full) for f in everyone), "replicas diverged"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["commrt", "gloo"])
def test_optim_flexdemo_fsdp2(backend):
    run_ranks(_flexdemo_fsdp_worker, 4, timeout=240, backend=backend)
