"""async_op=True overlaps: a collective posted by `dist.*(async_op=True)` makes progress while
its caller computes, without the caller calling wait() (or anything else in MPI).

How it is observed without timing: rank 0 posts a large asynchronous collective and then
only computes (torch matmuls; it never calls into MPI itself) while it watches a folder.
Every other rank runs the same collective *blocking* and, once its call has returned,
drops a file there. A collective completes on no rank before every rank has posted it,
and at these sizes (reductions, pipelined copies) not before every rank's MPI has worked
on it, so those files can only appear while rank 0 is still computing if rank 0's
collective was posted at call time *and* progressed in the background (the transport's
progress thread does that). If the backend only started (or only progressed) the
collective at wait(), no file ever appears, rank 0 gives up after a generous deadline
and the test fails. Results are then checked against a float64 reference.

DDP: with gradient_as_bucket_view the last layer's gradient lives in its bucket, which DDP
all-reduces as soon as that layer's backward is done. An earlier layer's backward is slow
(it computes while it watches that gradient): the gradient turning into the average over
ranks during that slow step shows the bucket's allreduce completed while backward was
still running.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from backend_util import init_commrt, rank_input
from harness import run_ranks

DEADLINE_S = 90.0          # generous: a loaded 2-core machine may be slow, never this slow
NUMEL = 1 << 20            # 4 MiB of float32: far beyond any eager threshold


def _compute_until(predicate, what: str) -> float:
    """Busy-compute (no MPI) until predicate() holds; the seconds it took. Raises if the
    deadline passes first."""
    if predicate():
        return 0.0
    a = torch.randn(128, 128, dtype=torch.float64)
    b = torch.randn(128, 128, dtype=torch.float64) / 128
    start = time.monotonic()
    while not predicate():
        for _ in range(4):
            a = torch.tanh(a @ b)
        if time.monotonic() - start > DEADLINE_S:
            raise AssertionError(
                f"{what}: not complete after {DEADLINE_S:.0f} s of computing; the collective "
                "made no progress while its caller computed (it only starts at wait()?)")
    return time.monotonic() - start


def _post(case: str, seed: int, rank: int, P: int, async_op: bool):
    """Post `case` on this rank; (work or None, output, expected output in float64)."""
    inputs = [rank_input(seed, r, case, (NUMEL,), torch.float64) for r in range(P)]
    mine = inputs[rank].float()
    if case.startswith("all_reduce"):
        out = mine
        expected = sum(inputs)
        work = dist.all_reduce(out, async_op=async_op)
    elif case == "all_gather_into_tensor":
        out = torch.empty(P * NUMEL)
        expected = torch.cat(inputs)
        work = dist.all_gather_into_tensor(out, mine, async_op=async_op)
    elif case == "reduce_scatter_tensor":
        big = [rank_input(seed, r, case, (P * NUMEL,), torch.float64) for r in range(P)]
        out = torch.empty(NUMEL)
        expected = sum(big)[rank * NUMEL:(rank + 1) * NUMEL]
        work = dist.reduce_scatter_tensor(out, big[rank].float(), async_op=async_op)
    else:  # broadcast from the computing rank
        out = mine
        expected = inputs[0]
        work = dist.broadcast(out, src=0, async_op=async_op)
    return work, out, expected


def _overlap_worker(seed: int, folder: str, cases: list[str]) -> None:
    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed + rank)
    for case in cases:
        marks = [os.path.join(folder, f"{case}.{r}") for r in range(1, P)]
        if rank == 0:
            work, out, expected = _post(case, seed, rank, P, async_op=True)
            if case == "all_reduce+future":
                fut = work.get_future()  # what DDP's reducer does with a bucket's Work
            took = _compute_until(lambda marks=marks: all(os.path.exists(m) for m in marks),
                                  f"seed {seed}: {case} on {P} ranks")
            work.wait()
            if case == "all_reduce+future":
                fut.wait()
            print(f"{case}: the other ranks completed after {took:.3f} s of computing")
        else:
            _, out, expected = _post(case, seed, rank, P, async_op=False)
            open(marks[rank - 1], "w").close()
        torch.testing.assert_close(
            out.double(), expected, rtol=1e-5, atol=1e-4,
            msg=lambda m, case=case: f"seed {seed}, {case}, rank {rank}: {m}")


@pytest.mark.parametrize("nprocs", [2, 3])
def test_async_collectives_progress_while_caller_computes(nprocs, tmp_path, seed):
    cases = ["all_reduce", "all_reduce+future", "all_gather_into_tensor",
             "reduce_scatter_tensor", "broadcast"]
    out = run_ranks(_overlap_worker, nprocs, timeout=300.0, seed=seed, folder=str(tmp_path),
                    cases=cases)
    for case in cases:
        assert f"{case}: the other ranks completed" in out, (seed, out[-3000:])


class _SlowBackward(torch.autograd.Function):
    """Identity forward; backward computes until `ready()` holds (no MPI in between)."""

    @staticmethod
    def forward(ctx, x, ready, label):
        ctx.ready, ctx.label = ready, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        took = _compute_until(ctx.ready, ctx.label)
        if took > 0:
            print(f"bucket allreduce completed during backward after {took:.3f} s")
        return grad, None, None


def _ddp_worker(seed: int) -> None:
    init_commrt()
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # same initial weights everywhere (DDP broadcasts them anyway)
    first, last = torch.nn.Linear(64, 512), torch.nn.Linear(512, 512)
    x = {r: rank_input(seed, r, "x", (32, 64), torch.float32) for r in range(P)}

    # Reference (one process, float64): the last layer's weight gradient on every rank's
    # data, averaged as DDP does.
    def local_grad(r: int) -> torch.Tensor:
        f, l = torch.nn.Linear(64, 512).double(), torch.nn.Linear(512, 512).double()
        f.load_state_dict(first.state_dict())
        l.load_state_dict(last.state_dict())
        l(torch.relu(f(x[r].double()))).square().sum().backward()
        return l.weight.grad
    grads = [local_grad(r) for r in range(P)]
    average = sum(grads) / P
    assert not torch.allclose(grads[rank], average, rtol=1e-3, atol=1e-4), "ranks' data agree"

    armed = [False]

    def reduced() -> bool:
        if not armed[0]:
            return True
        g = last.weight.grad
        return g is not None and (torch.allclose(g.double(), average, rtol=1e-3, atol=1e-4)
                                  or torch.allclose(g.double(), average * P, rtol=1e-3, atol=1e-4))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.last = first, last

        def forward(self, inp):
            h = _SlowBackward.apply(torch.relu(self.first(inp)), reduced,
                                    f"seed {seed}: DDP bucket of the last layer on {P} ranks")
            return self.last(h)

    # After the first iteration DDP rebuilds its buckets in the order gradients became
    # ready: the last layer's (1 MiB + 2 KiB, over bucket_cap_mb) forms the first bucket,
    # posted before the slow step; the first layer's parameters go to a second bucket,
    # posted only after it. The first iteration (in which DDP's initial buckets may still
    # hold every parameter) does not watch.
    ddp = torch.nn.parallel.DistributedDataParallel(Net(), bucket_cap_mb=0.05,
                                                    gradient_as_bucket_view=True)
    for armed[0] in (False, True):
        ddp.zero_grad(set_to_none=False)
        ddp(x[rank]).square().sum().backward()
    torch.testing.assert_close(last.weight.grad.double(), average, rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"seed {seed}, rank {rank}: {m}")


def test_ddp_bucket_allreduce_completes_during_backward(seed):
    out = run_ranks(_ddp_worker, 2, timeout=300.0, seed=seed)
    assert out.count("bucket allreduce completed during backward") == 2, (seed, out[-3000:])
