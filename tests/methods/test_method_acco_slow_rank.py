"""ACCO with one rank slowed by a sleep: the fast ranks contribute more micro-batches per
round, nothing deadlocks, and the applied gradient is the count-weighted average (a
linear model whose per-rank gradient is known in closed form)."""
import pytest
from harness import run_ranks

LR, BETAS = 0.01, (0.9, 0.999)


def _rank_batch(rank: int, d: int):
    import torch

    g = torch.Generator().manual_seed(500 + rank)
    return (torch.randn(3, d, generator=g, dtype=torch.float64),
            torch.randn(3, 1, generator=g, dtype=torch.float64))


def _linear_loss(out, target):
    # d/dW of mean_i(target_i * W x_i) = mean_i target_i x_i^T: independent of W.
    return (out * target).mean()


def _slow_worker(steps: int, d: int, slow_s: float) -> None:
    import math
    import time

    import torch
    from torch import nn

    from commrt import transports as T
    from commrt.optim import ACCO

    comm = T.world()
    P, r = comm.size, comm.rank
    torch.manual_seed(1)
    model = nn.Linear(d, 1, bias=False).double()
    w0 = model.weight.detach().clone()
    comm.ibroadcast(w0, 0).wait()
    method = ACCO(model, LR, BETAS, 0.0, comm, max_micro_batches=200)
    x, y = _rank_batch(r, d)

    def next_batch():
        time.sleep(slow_s if r == 0 else slow_s / 40)
        return x, y

    for _ in range(steps):
        method.step(next_batch, _linear_loss)
    method.close()

    history = comm.allgather_object([(h["dry_run"], h["local_count"], h["global_count"])
                                     for h in method.history])
    counts = [[c for _, c, _ in ranks_rounds] for ranks_rounds in history]
    for rnd in range(len(history[0])):
        assert sum(counts[q][rnd] for q in range(P)) == history[0][rnd][2]
    slow_total = sum(counts[0])
    for q in range(1, P):
        assert sum(counts[q]) > 2 * slow_total, (
            f"fast rank {q} did not accumulate more micro-batches: {counts}")

    # Replay: estimate rounds never change θ (the gradient does not depend on it); real
    # round k applies AdamW with Σ_q c_q G_q / Σ_q c_q, c_q that round's count of rank q.
    G = [( _rank_batch(q, d)[1] * _rank_batch(q, d)[0]).mean(0, keepdim=True) for q in range(P)]
    theta = w0.clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    t = 0
    b1, b2 = BETAS
    for rnd, (dry, _, total) in enumerate(history[0]):
        if dry:
            continue
        g = sum(counts[q][rnd] * G[q] for q in range(P)) / total
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - LR / (1 - b1 ** t) * m / (torch.sqrt(v) / math.sqrt(1 - b2 ** t) + 1e-8)
    assert t == steps
    torch.testing.assert_close(model.weight.detach(), theta, rtol=1e-9, atol=1e-12)
    # an unweighted mean of the per-rank gradients would give a different trajectory
    s = method.stats()
    assert s["rounds"] == 2 * steps and s["comm_s"] > 0


@pytest.mark.parametrize("nprocs", [2, 3])
def test_acco_slow_rank_weighted_by_counts(nprocs):
    run_ranks(_slow_worker, nprocs, timeout=240, steps=3, d=6, slow_s=0.2)
