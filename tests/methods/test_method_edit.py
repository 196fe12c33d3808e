"""EDiT (commrt.optim.EDiT) under mpirun, one launch per world size; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and each check is its own test:

- equals_data_parallel: with τ = 1, no penalty, outer lr 1 and no momentum EDiT equals
  synchronous data-parallel SGD (float64 reference over all ranks' batches); its wire bytes
  match the docstring formula every step;
- anomaly_elimination: an injected outlier replica is excluded and training continues;
- compressed_exchanges: sparse and quantized pseudo-gradient exchanges leave identical
  replicas and send fewer bytes than dense;
- foreign_group_refused: a process group that is not the mesh's is refused.
"""
from __future__ import annotations

import math

import pytest
import torch
from harness import assert_check, checks_fixture, run_checks
from torch import nn


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 9973 + rank * 101 + step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _same_everywhere(comm, model: nn.Module, what: str) -> None:
    mine = _flat(model)
    for other in comm.allgather_object(mine):
        assert torch.equal(other, mine), f"{what}: parameters differ across ranks"


WORLD_SIZES = [2, 6]
CHECKS = ["equals_data_parallel", "anomaly_elimination", "compressed_exchanges",
          "foreign_group_refused"]


def _two_level_mesh_rpn(P: int) -> int:
    return 2 if P % 2 == 0 and P > 2 else 1


def _check_equals_data_parallel(comm, seed: int) -> None:
    from commrt import transports as T
    from commrt.optim import EDiT, HybridMesh

    P, rank = comm.size, comm.rank
    lr, steps, warmup = 0.1, 5, 2

    for rpn in sorted({1, _two_level_mesh_rpn(P)}):
        # 1. EDiT(τ=1, no penalty, η=1, μ=0) == data-parallel SGD on the global mean gradient
        mesh = HybridMesh(ranks_per_node=rpn)
        m, R = rpn, P // rpn
        model = _model(seed)
        reference = _model(seed).double()
        method = EDiT(model, torch.optim.SGD(model.parameters(), lr=lr), sync_interval=1,
                      warmup_steps=warmup, outer_lr=1.0, outer_momentum=0.0, penalty=False,
                      mesh=mesh)
        counter = iter(range(10 ** 6))
        n = sum(p.numel() for p in model.parameters())
        slices = [math.ceil(sum(p.numel() for p in layer.parameters(recurse=False)) / m)
                  for layer in (model[0], model[2])]
        sync_bytes = sum(2 * (R - 1) * 4 * s // R + (m - 1) * 4 * s for s in slices)
        for step in range(steps):
            batch_step = next(counter)
            before = T.wire.total_bytes()
            method.step(lambda s=batch_step: _batch(seed, rank, s), _loss)
            sent = T.wire.total_bytes() - before
            assert sent == method.last_step_wire_bytes, (sent, method.last_step_wire_bytes)
            if step < warmup:
                want = 2 * (P - 1) * 4 * n // P
            else:
                want = 2 * (m - 1) * 4 * n // m + (sync_bytes if step > warmup else 0)
            assert sent == want, (step, sent, want)
            # reference: one SGD step on the mean gradient over all ranks' batches
            reference.zero_grad()
            for r in range(P):
                x, y = _batch(seed, r, batch_step)
                (_loss(reference(x.double()), y.double()) / P).backward()
            with torch.no_grad():
                for p in reference.parameters():
                    p -= lr * p.grad
        method.flush()
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-5, atol=1e-6)
        _same_everywhere(comm, model, f"EDiT rpn={rpn}")
        assert method.syncs == steps - warmup
        method.close()


def _check_anomaly_elimination(comm, seed: int) -> None:
    """Replicas on a 2-D mesh, one replica's parameters perturbed by 1e3 after detection is
    active: it is excluded and training continues."""
    from commrt.optim import EDiT, HybridMesh

    P, rank = comm.size, comm.rank
    rpn = _two_level_mesh_rpn(P)
    mesh, R = HybridMesh(ranks_per_node=rpn), P // rpn
    model = _model(seed + 1)
    method = EDiT(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_interval=2,
                  warmup_steps=2, mesh=mesh, anomaly_window=3, clip=10.0)
    step = 0
    bad_sync = None
    for round_ in range(9):
        for _ in range(2):
            method.step(lambda s=step: _batch(seed, rank, s), _loss)
            step += 1
        if round_ == 6:
            method.flush()
            bad_sync = method.syncs
            if mesh.node_index == R - 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e3)
    method.flush()
    flagged = {(s, l) for s, l, replica in method.outliers if replica == R - 1 and s == bad_sync}
    assert flagged == {(bad_sync, 0), (bad_sync, 1)}, (bad_sync, method.outliers)
    flat = _flat(model)
    assert torch.isfinite(flat).all() and flat.abs().max() < 50, flat.abs().max()
    _same_everywhere(comm, model, "after outlier")
    losses = [method.step(lambda i=i: _batch(seed, rank, 1000 + i), _loss) for i in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert method.local_steps == 1
    method.flush(force=True)               # a synchronization after an incomplete round
    state = method.state_dict()
    assert state["counters"]["syncs"] == method.syncs
    _same_everywhere(comm, model, "after training on")
    method.close()


def _check_compressed_exchanges(comm, seed: int) -> None:
    from commrt.optim import EDiT, HybridMesh

    P, rank = comm.size, comm.rank
    rpn = _two_level_mesh_rpn(P)
    mesh, R = HybridMesh(ranks_per_node=rpn), P // rpn
    sync_bytes = {}
    for exchange in ("dense", "sparse", "quantized"):
        torch.manual_seed(seed + 2)   # wide enough that 8-bit blocks beat fp32
        model = nn.Sequential(nn.Linear(6, 512), nn.Tanh(), nn.Linear(512, 3))
        method = EDiT(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_interval=2,
                      warmup_steps=0, mesh=mesh, exchange=exchange, density=0.25, bits=8)
        for i in range(5):
            method.step(lambda i=i: _batch(seed, rank, 2000 + i), _loss)
        method.flush(force=True)
        sync_bytes[exchange] = method.last_sync_wire_bytes
        _same_everywhere(comm, model, f"exchange={exchange}")
        assert torch.isfinite(_flat(model)).all()
        method.close()
    if R > 1:
        assert sync_bytes["sparse"] < sync_bytes["dense"], sync_bytes
        assert sync_bytes["quantized"] < sync_bytes["dense"], sync_bytes


def _check_foreign_group_refused(comm, seed: int) -> None:
    from commrt.optim import EDiT, HybridMesh

    P, rank = comm.size, comm.rank
    mesh = HybridMesh(ranks_per_node=_two_level_mesh_rpn(P))
    model = _model(seed)
    sub = comm.split(0 if rank < P // 2 else 1)
    with pytest.raises(ValueError, match="does not match the mesh"):
        EDiT(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, mesh=mesh,
             process_group=sub)


def _edit_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


launch = checks_fixture(_edit_worker, WORLD_SIZES, timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_edit_multi_rank(launch, check):
    assert_check(launch, check)


def test_optim_edit_bad_configuration():
    from commrt.optim import EDiT

    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sync_interval"):
        EDiT(model, opt, sync_interval=0)
    with pytest.raises(ValueError, match="exchange"):
        EDiT(model, opt, sync_interval=2, exchange="carrier-pigeon")
