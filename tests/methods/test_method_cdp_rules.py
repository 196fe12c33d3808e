"""CDP under mpirun, each rule a check of its own (one launch per world size, fresh
batches per launch): v1 equals data parallelism with a one-step-delayed gradient (plain,
sharded, several staggered workers per device) with the ring's wire bytes, v2 applies the
fresh or delayed mean gradient per stage exactly by the rule for each rank, and staggering
the workers of one device lowers the peak activation memory."""
import pytest
from harness import assert_check, checks_fixture, generator, run_checks

K = 3


def _model(width: int = 6):
    import torch
    from torch import nn

    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 2)).double()


_seed = 0  # the launch's fresh seed, set by the worker (one process per rank)


def _batch(rank: int, step: int, worker: int, rows: int = 3):
    import torch

    g = generator(_seed, "batch", rank, step, worker)
    return (torch.randn(rows, 4, generator=g, dtype=torch.float64),
            torch.randn(rows, 2, generator=g, dtype=torch.float64))


def _loss(out, target):
    return ((out - target) ** 2).mean()


def _sgd(params):
    import torch

    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)


def _mean_grads(model, P: int, step: int, W: int, rows: int = 3):
    """Mean over ranks and workers of the gradient at `model`'s parameters (float64)."""
    import torch

    total = [torch.zeros_like(p) for p in model.parameters()]
    for r in range(P):
        for w in range(W):
            model.zero_grad()
            x, y = _batch(r, step, w, rows)
            _loss(model(x), y).backward()
            for acc, p in zip(total, model.parameters()):
                acc += p.grad
    return [g / (P * W) for g in total]


def _delayed_dp_reference(P: int, steps: int, W: int, make_opt, rows: int = 3, width: int = 6):
    model = _model(width)
    opt = make_opt(model.parameters())
    prev = None
    for t in range(steps):
        grads = _mean_grads(model, P, t, W, rows)
        if prev is not None:
            for p, g in zip(model.parameters(), prev):
                p.grad = g.clone()
            opt.step()
        prev = grads
    return model


def _v2_reference(P: int, steps: int, stage_of: list[int]):
    """Replica r updates stage l with the fresh mean gradient if l >= K-1-r, else with the
    previous step's (and skips the stage at step 0)."""

    replicas = [_model() for _ in range(P)]
    opts = [_sgd(m.parameters()) for m in replicas]
    prev = None
    for t in range(steps):
        per_rank = []
        for r in range(P):
            m = replicas[r]
            m.zero_grad()
            x, y = _batch(r, t, 0)
            _loss(m(x), y).backward()
            per_rank.append([p.grad.clone() for p in m.parameters()])
        fresh = [sum(g[i] for g in per_rank) / P for i in range(len(per_rank[0]))]
        for r in range(P):
            for i, p in enumerate(replicas[r].parameters()):
                use_fresh = stage_of[i] >= K - 1 - r
                p.grad = fresh[i].clone() if use_fresh else (
                    None if prev is None else prev[i].clone())
            opts[r].step()
        prev = fresh
    return replicas


def _params(model):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


STEPS = 4
WORLD_SIZES = [2, 3, 4]
# (sharded, optimizer, given as a factory) of the v1 checks: plain; sharded with the given
# optimizer re-pointed at the masters (AdamW); sharded with a factory (SGD with momentum)
V1 = {"v1_plain": (False, _sgd, False), "v1_sharded_adamw": (True, _adamw, False),
      "v1_sharded_factory": (True, _sgd, True)}
CHECKS = [*V1, "v1_staggered_workers", "v2_rule_per_rank"]


def _run(method, comm, W: int, rows: int = 3):
    for t in range(STEPS):
        feed = iter(_batch(comm.rank, t, w, rows) for w in range(W))
        loss = method.step(lambda f=feed: next(f), _loss)
        assert loss == loss
    return method


def _check_v1(comm, sharded: bool, make_opt, factory: bool) -> None:
    """v1 equals DP with a one-step-delayed gradient; the ring's wire bytes."""
    import torch

    from commrt import transports as T
    from commrt.collectives.cyclic import expected_wire_bytes
    from commrt.optim import CDP

    P, r = comm.size, comm.rank
    model = _model()
    before = T.wire.snapshot()
    opt = make_opt if factory else make_opt(model.parameters())
    method = _run(CDP(model, opt, stages=K, rule="v1", process_group=comm, sharded=sharded),
                  comm, 1)
    want = _delayed_dp_reference(P, STEPS, 1, make_opt)
    method.state_dict()  # completes what is in flight (collective), keeps parameters
    torch.testing.assert_close(_params(model), _params(want), rtol=1e-10, atol=1e-12)
    for other in comm.allgather_object(_params(model)):
        assert torch.equal(other, _params(model)), "ranks differ"
    sent = T.snapshot_delta(T.wire.snapshot(), before)
    kinds = {k for k in sent if k.startswith("cdp_") and k != "cdp_init"}
    expect = {"cdp_reduce_scatter", "cdp_allgather"} if sharded else {"cdp_allreduce"}
    assert P == 1 or kinds == expect, sent
    # the ring's formula: one gradient ring per step (the last one completed by
    # state_dict), one parameter ring per update when sharded
    numels = method.stage_numel
    if sharded:
        want_bytes = {"cdp_reduce_scatter": STEPS * expected_wire_bytes(
            numels, 8, r, P, "reduce_scatter"), "cdp_allgather": (STEPS - 1) *
            expected_wire_bytes(numels, 8, r, P, "allgather")}
    else:
        want_bytes = {"cdp_allreduce": STEPS * expected_wire_bytes(numels, 8, r, P)}
    for k, b in want_bytes.items():
        assert sent.get(k, (0, 0))[0] == b, (k, sent, b)
    s = method.stats()
    assert s["steps"] == STEPS and 0.0 <= s["overlap_fraction"] <= 1.0
    if P > 1:
        assert s["peak_in_flight_bytes"] > 0 and s["ring_bytes"] > 0


def _check_v1_staggered_workers(comm) -> None:
    """Several workers per device, staggered and not: the same result, and staggering
    lowers the peak activation memory."""
    import torch

    from commrt.optim import CDP

    peaks = {}
    for stagger in (True, False):
        model = _model(width=64)
        method = _run(CDP(model, _sgd(model.parameters()), stages=K, rule="v1",
                          process_group=comm, workers_per_device=4, stagger=stagger),
                      comm, 4, rows=16)
        method.flush()
        want = _delayed_dp_reference(comm.size, STEPS, 4, _sgd, rows=16, width=64)
        torch.testing.assert_close(_params(model), _params(want), rtol=1e-9, atol=1e-11)
        peaks[stagger] = method.stats()["peak_activation_bytes"]
    assert peaks[False] > 0 and peaks[True] <= 0.6 * peaks[False], peaks


def _check_v2_rule_per_rank(comm) -> None:
    """v2: the per-rank rule, against per-replica references."""
    import torch

    from commrt.optim import CDP

    model = _model()
    method = _run(CDP(model, _sgd(model.parameters()), stages=K, rule="v2",
                      process_group=comm), comm, 1)
    ids = {id(p): l for l, ps in enumerate(method.stage_params) for p in ps}
    stage_of = [ids[id(p)] for p in model.parameters()]
    method.close()
    replicas = _v2_reference(comm.size, STEPS, stage_of)
    torch.testing.assert_close(_params(model), _params(replicas[comm.rank]), rtol=1e-10,
                               atol=1e-12)
    if comm.size >= 2:  # the rule really differs between ranks 0 and 1 (stage K-2)
        assert not torch.equal(_params(replicas[0]), _params(replicas[1]))


def _cdp_worker(seed: int) -> None:
    from commrt import transports as T

    global _seed
    _seed = seed

    comm = T.world()
    checks = {name: (lambda sharded=sharded, opt=opt, factory=factory:
                     _check_v1(comm, sharded, opt, factory))
              for name, (sharded, opt, factory) in V1.items()}
    checks["v1_staggered_workers"] = lambda: _check_v1_staggered_workers(comm)
    checks["v2_rule_per_rank"] = lambda: _check_v2_rule_per_rank(comm)
    run_checks(checks, rank=comm.rank)


launch = checks_fixture(_cdp_worker, WORLD_SIZES, timeout=300)


@pytest.mark.parametrize("check", CHECKS)
def test_cdp_rules(launch, check):
    assert_check(launch, check)
