"""A-EDiT (commrt.optim.AEDiT): time-based rounds agreed across ranks. With one slowed rank
the fast ranks keep stepping (more inner steps per round) and every rank ends with the same
synchronized parameters."""
from __future__ import annotations

import math
import time

import pytest
import torch
from harness import run_ranks
from torch import nn


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _aedit_worker(seed: int, rounds: int) -> None:
    from commrt import transports as T
    from commrt.optim import AEDiT

    comm = T.world()
    P, rank = comm.size, comm.rank
    slow = rank == P - 1
    rpn = 2 if P % 2 == 0 and P > 2 else 1
    gen = torch.Generator().manual_seed(seed * 31 + rank)

    def next_batch():
        if slow:
            time.sleep(0.1)   # the deliberately slowed rank
        return torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)

    # 1. a fixed interval: fast ranks take more inner steps per round than the slow one
    model = _model(seed)
    method = AEDiT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_interval=4,
                   warmup_steps=1, sync_seconds=0.5, ranks_per_node=1)
    counts = []
    for _ in range(rounds):
        loss = method.step(next_batch, _loss)
        assert math.isfinite(loss)
        counts.append(method.last_round_steps)
    method.flush()
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = comm.allgather_object((mine, sum(counts[1:]), method.syncs))
    for params, _, syncs in everyone:
        assert torch.equal(params, mine), "ranks differ after the final synchronization"
        assert syncs == method.syncs == rounds - 1
    slow_steps = everyone[-1][1]
    fast_steps = [c for _, c, _ in everyone[:-1]]
    assert slow_steps <= (rounds - 1) * 7, slow_steps   # ≈ 0.5 s / 0.1 s per step
    assert min(fast_steps) > 1.5 * slow_steps, (fast_steps, slow_steps)
    method.close()

    # 2. the interval agreed from measured local step times, on the 2-D mesh
    model = _model(seed + 1)
    method = AEDiT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_interval=3,
                   warmup_steps=2, ranks_per_node=rpn)
    rounds_seen = []
    for _ in range(4):
        method.step(next_batch, _loss)
        rounds_seen.append(method.last_round_steps)
    method.flush()
    # two warm-up steps, then the calibrating round of exactly sync_interval local steps
    assert rounds_seen[:3] == [1, 1, 3], rounds_seen
    # ranks of one node share every inner step's gradients: equal step counts per round
    per_rank = comm.allgather_object(rounds_seen)
    for node in range(P // rpn):
        members = per_rank[node * rpn:(node + 1) * rpn]
        assert all(r == members[0] for r in members), per_rank
    agreed = comm.allgather_object(method.sync_seconds)
    assert all(a == agreed[0] for a in agreed) and agreed[0] > 0, agreed
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all(torch.equal(x, mine) for x in comm.allgather_object(mine))
    state = method.state_dict()
    assert state["extra"]["sync_seconds"] == agreed[0]


@pytest.mark.parametrize("nprocs", [2, 4])
def test_optim_edit_async_slow_rank(nprocs):
    run_ranks(_aedit_worker, nprocs, timeout=240, seed=nprocs, rounds=4)
