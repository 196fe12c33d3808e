"""ACCO, ZeRO-1 and DPU with fixed micro-batch counts equal single-process float64
references of their update rules on the concatenated batches; the dry run leaves the
optimizer state bit-identical; every rank ends with the same parameters. Also on CUDA
parameters (ACCO's communication then runs on its own CUDA stream), where a GPU is."""
import pytest
import torch
from harness import run_ranks

LR, BETAS, WD, EPS = 0.05, (0.9, 0.99), 0.1, 1e-8


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(rank: int, index: int):
    import torch

    g = torch.Generator().manual_seed(10_000 * rank + index)
    return (torch.randn(4, 5, generator=g, dtype=torch.float64),
            torch.randn(4, 3, generator=g, dtype=torch.float64))


def _loss(out, target):
    return ((out - target) ** 2).mean()


def _reference(mode: str, P: int, n: int, steps: int):
    """Float64 single-process replay of the update rule of `mode` (own AdamW formula)."""
    import math

    import torch

    model = _model()
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    mask = torch.cat([torch.full((p.numel(),), 1.0 if p.dim() >= 2 else 0.0,
                                 dtype=torch.float64) for p in params])
    state = {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta), "t": 0}

    def grad_sum(flat, phase):
        """Sum over ranks and the phase's n micro-batches of the gradient at `flat`."""
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        total = torch.zeros_like(flat)
        for r in range(P):
            for j in range(phase * n, (phase + 1) * n):
                model.zero_grad()
                x, y = _batch(r, j)
                _loss(model(x), y).backward()
                total += torch.cat([p.grad.reshape(-1) for p in params])
        return total, P * n

    def adamw(flat, g, dry):
        b1, b2 = BETAS
        t = state["t"] + 1
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        new = flat * (1 - LR * WD * mask)
        new = new - LR / (1 - b1 ** t) * m / (torch.sqrt(v) / math.sqrt(1 - b2 ** t) + EPS)
        if not dry:
            state.update(m=m, v=v, t=t)
        return new

    phase = 0
    if mode == "zero1":
        for _ in range(steps):
            g, c = grad_sum(theta, phase)
            phase += 1
            theta = adamw(theta, g / c, False)
    elif mode == "dpu":
        pending = None
        for _ in range(steps):
            g, c = grad_sum(theta, phase)
            phase += 1
            if pending is not None:
                theta = adamw(theta, pending[0] / pending[1], False)
            pending = (g, c)
    else:  # acco
        h, hc = grad_sum(theta, phase)
        phase += 1
        for _ in range(steps):
            estimate = adamw(theta, h / hc, True)
            g, gc = grad_sum(theta, phase)
            h_next, h_next_c = grad_sum(estimate, phase + 1)
            phase += 2
            theta = adamw(theta, (h + g) / (hc + gc), False)
            h, hc = h_next, h_next_c
    return theta


def _equivalence_worker(n: int, steps: int, device: str = "cpu") -> None:
    from commrt import transports as T
    from commrt.optim import ACCO, DPU, ZeRO1

    comm = T.world()
    P, r = comm.size, comm.rank
    dev = torch.device("cpu") if device == "cpu" else \
        torch.device("cuda", r % torch.cuda.device_count())

    def batch(index: int):
        return tuple(t.to(dev) for t in _batch(r, index))
    configs = [("acco", ACCO, dict(sync_comm=True)),
               ("acco", ACCO, dict(sync_comm=False)),      # real thread, fixed counts
               ("zero1", ZeRO1, {}),
               ("dpu", DPU, dict(sync_comm=False))]
    for mode, cls, extra in configs:
        model = _model().to(dev)
        method = cls(model, LR, BETAS, WD, comm, micro_batches=n, **extra)
        if dev.type == "cuda" and mode == "acco" and not extra["sync_comm"]:
            assert method._stream is not None, "ACCO on CUDA without its own stream"
        counter = iter(range(10 ** 6))
        for _ in range(steps):
            loss = method.step(lambda c=counter: batch(next(c)), _loss)
            assert loss == loss and loss > 0
        method.close()
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        want = _reference(mode, P, n, steps)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10,
                                   msg=lambda m, mode=mode, extra=extra: f"{mode} {extra}: {m}")
        everyone = comm.allgather_object(got)
        for other in everyone:
            assert torch.equal(other, got), f"{mode}: ranks ended with different parameters"
        rounds = {"acco": 2 * steps, "zero1": steps, "dpu": steps - 1}[mode]
        assert len(method.history) == rounds
        for h in method.history:
            assert h["local_count"] == (2 * n if (mode == "acco" and not h["dry_run"]) else n)
            assert h["global_count"] == P * h["local_count"]
        s = method.stats()
        assert s["micro_batches"] == n * (2 * steps + 1 if mode == "acco" else steps)
        # the state dict round-trips (sharded: per rank)
        sd = method.state_dict()
        twin = cls(_model().to(dev), LR, BETAS, WD, comm, micro_batches=n, **extra)
        twin.load_state_dict(sd)
        _assert_same_state(twin.shard.state_dict(), method.shard.state_dict())
        twin.close()

    # The dry run: state bit-identical before and after, estimate equals the real step.
    method = ACCO(_model().to(dev), LR, BETAS, WD, comm, micro_batches=n, sync_comm=True)
    counter = iter(range(10 ** 6))
    method.step(lambda: batch(next(counter)), _loss)
    shard = method.shard
    master = shard.masters[0]
    before = shard.state_dict()
    grad = torch.randn(master.shape, dtype=master.dtype).to(master.device)
    estimate = shard.update([grad], dry_run=True)[0]
    _assert_same_state(shard.state_dict(), before)
    assert not torch.equal(estimate, master)
    real = shard.update([grad], dry_run=False)[0].clone()
    assert torch.equal(real, estimate)
    steps = [s["step"] for s in shard.state_dict()["optimizer"]["state"].values()]
    assert steps == [s["step"] + 1 for s in before["optimizer"]["state"].values()]


def _assert_same_state(got, want, where="state"):
    import torch

    if torch.is_tensor(want):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_same_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_state(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_acco_zero1_dpu_match_references(nprocs):
    run_ranks(_equivalence_worker, nprocs, timeout=300, n=2, steps=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nprocs", [2, 3])
def test_acco_zero1_dpu_match_references_cuda(nprocs):
    """The same on CUDA parameters: ACCO's rounds run on its own CUDA stream."""
    run_ranks(_equivalence_worker, nprocs, timeout=300, env={"TRITON_INTERPRET": "0"}, n=2,
              steps=3, device="cuda")
