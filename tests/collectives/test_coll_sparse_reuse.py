"""Threshold reuse in sparse_allreduce (`reuse_steps`, `reuse_eps`), under mpirun at 1-5 ranks.

One launch per world size; each rank prints ``CHECK <name> rank <r> OK|FAIL``:

- equal:        with reuse on, every algorithm (spardl at every team count and both SAG
                variants, topka, gtopk) gives bitwise the tensor and residual of the same
                call site without reuse, step after step, while reuse is exercised; topka
                also matches an independent float64 reference (each rank's torch.topk);
- conservation: Σ residual_after + P·result == Σ (tensor + residual), float64, reuse on;
- bounds:       a site that reused its threshold had every candidate count in
                [k, ⌊(1+eps)·k⌋]; a site that did not either had none kept, a count outside
                the band, or a threshold that had served reuse_steps calls;
- triggers:     a threshold serves exactly reuse_steps calls on a steady input; a jump
                in scale (counts out of the band) forces a re-estimate; the state_dict
                carries the thresholds: a fresh call site loaded from it reuses at once
                and gives the same result.

Single process: parameter validation.
"""
import math

import pytest
import torch
from harness import assert_check, checks_fixture, gather_rows, generator, run_checks

WORLD_SIZES = [1, 2, 3, 4, 5]
CHECKS = ["equal", "conservation", "bounds", "triggers"]


# --------------------------------------------------------------------------------------
# worker side


def _configs(P):
    out = [("topka", 1, "bruck"), ("gtopk", 1, "bruck")]
    for d in range(1, P + 1):
        if P % d == 0:
            out.append(("spardl", d, "bruck"))
            if d > 1 and d & (d - 1) == 0:
                out.append(("spardl", d, "recursive"))
    return out


def _steps(comm, seed, n, case, count=8):
    """(gradient, reset residual?) per step: a steady gradient with a little noise, the
    residual mostly restarted (a steady |X|: thresholds get reused) and sometimes kept
    (X jumps: re-estimates)."""
    g = generator(seed, "steps", case, comm.rank)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    return [(base + 0.02 * torch.randn(n, generator=g, dtype=torch.float64), step % 4 != 3)
            for step in range(count)]


def _reused_sites(reducer):
    return sum(site["reused"] for site in reducer.last["selection"].values())


def _check_equal(comm, seed):
    from commrt.collectives import SparseAllreduce

    P = comm.size
    reused = 0
    for i, (alg, teams, sag) in enumerate(_configs(P)):
        for n in (37, 3001):
            on = SparseAllreduce(0.05, alg, teams=teams, sag=sag, reuse_steps=4, reuse_eps=0.5)
            off = SparseAllreduce(0.05, alg, teams=teams, sag=sag)
            r_on = torch.zeros(n, dtype=torch.float64)
            r_off = torch.zeros(n, dtype=torch.float64)
            for step, (grad, reset) in enumerate(_steps(comm, seed, n, 10 + i)):
                if reset:
                    r_on.zero_()
                    r_off.zero_()
                x = grad + r_on
                t_on, t_off = grad.clone(), grad.clone()
                on(t_on, r_on)
                off(t_off, r_off)
                reused += _reused_sites(on)
                assert torch.equal(t_on, t_off) and torch.equal(r_on, r_off), \
                    f"{alg} teams={teams} {sag} n={n} step {step}: reuse changed the result"
                if alg == "topka":
                    # independent: the mean of every rank's exact top-k (float64 topk)
                    k = math.ceil(0.05 * n)
                    top = torch.zeros(n, dtype=torch.float64)
                    idx = x.abs().topk(k).indices
                    top[idx] = x[idx]
                    expected = gather_rows(comm, top).mean(0)
                    err = (t_on - expected).abs().max().item()
                    assert err < 1e-12, f"topka n={n} step {step}: off the reference by {err}"
    assert reused > 0, "threshold reuse was never exercised"


def _check_conservation(comm, seed):
    from commrt.collectives import SparseAllreduce

    P = comm.size
    for i, (alg, teams, sag) in enumerate(_configs(P)):
        reducer = SparseAllreduce(0.1, alg, teams=teams, sag=sag, reuse_steps=3)
        residual = torch.zeros(1000, dtype=torch.float64)
        for step, (grad, reset) in enumerate(_steps(comm, seed, 1000, 50 + i)):
            if reset:
                residual.zero_()
            tensor = grad.clone()
            total_in = gather_rows(comm, tensor + residual).sum(0)
            reducer(tensor, residual)
            gap = (gather_rows(comm, residual).sum(0) + P * tensor - total_in).abs().max().item()
            assert gap < 1e-11, f"{alg} teams={teams} {sag} step {step}: off by {gap}"
            results = gather_rows(comm, tensor)
            assert torch.equal(results.min(0).values, results.max(0).values), \
                f"{alg} teams={teams}: ranks hold different results"


def _check_bounds(comm, seed):
    from commrt.collectives import SparseAllreduce

    P = comm.size
    steps_limit, eps = 3, 0.3
    for i, (alg, teams, sag) in enumerate(_configs(P)):
        reducer = SparseAllreduce(0.05, alg, teams=teams, sag=sag, reuse_steps=steps_limit,
                                  reuse_eps=eps)
        residual = torch.zeros(4000, dtype=torch.float64)
        ages: dict[str, int] = {}
        for step, (grad, reset) in enumerate(_steps(comm, seed, 4000, 80 + i, count=10)):
            if reset:
                residual.zero_()
            reducer(grad.clone(), residual)
            for site, info in reducer.last["selection"].items():
                k, counts = info["k"], info["candidates"]
                assert info["cap"] == math.floor((1 + eps) * k), (site, info)
                in_band = counts is not None and all(k <= c <= info["cap"] for c in counts)
                if info["reused"]:
                    assert in_band, f"{alg} step {step} {site}: reused out of band {info}"
                    assert ages[site] < steps_limit, f"{site}: threshold served too long"
                    ages[site] += 1
                else:
                    assert counts is None or not in_band or ages[site] == steps_limit, \
                        f"{alg} step {step} {site}: re-estimated without a reason {info}"
                    ages[site] = 1


def _check_triggers(comm, seed):
    from commrt.collectives import SparseAllreduce

    P = comm.size
    n = 2000
    g = generator(seed, "triggers", comm.rank)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    for alg in ("topka", "spardl"):
        reducer = SparseAllreduce(0.05, alg, reuse_steps=3)
        pattern = []
        for _ in range(7):   # the same X every call: only the age ends a threshold
            reducer(grad.clone(), torch.zeros(n, dtype=torch.float64))
            pattern.append(all(s["reused"] for s in reducer.last["selection"].values()))
        assert pattern == [False, True, True, False, True, True, False], (alg, pattern)
        # X ten times larger: every count leaves the band, the thresholds are re-estimated
        reducer(10 * grad, torch.zeros(n, dtype=torch.float64))
        sel = reducer.last["selection"]
        assert not any(s["reused"] for s in sel.values()), sel
        assert all(c > s["cap"] for s in sel.values() for c in s["candidates"]), sel
        reducer(10 * grad, torch.zeros(n, dtype=torch.float64))
        assert all(s["reused"] for s in reducer.last["selection"].values())
        # the thresholds travel in the state_dict: a fresh call site continues with them
        saved = reducer.state_dict()
        assert saved["thresholds"], saved
        fresh = SparseAllreduce(0.05, alg, reuse_steps=3)
        fresh.load_state_dict(saved)
        assert fresh.state_dict() == saved
        a, b = 10 * grad, 10 * grad
        r_a, r_b = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        reducer(a, r_a)
        fresh(b, r_b)
        assert reducer.last["selection"] == fresh.last["selection"]
        assert all(s["reused"] for s in fresh.last["selection"].values())
        assert torch.equal(a, b) and torch.equal(r_a, r_b)
    # the functional API keeps its call site (and thresholds) per residual tensor
    from commrt.collectives import sparse_allreduce

    residual = torch.zeros(n, dtype=torch.float64)
    outs = []
    for _ in range(3):
        residual.zero_()
        t = grad.clone()
        sparse_allreduce(t, residual, 0.05, algorithm="topka", reuse_steps=5)
        outs.append(t)
    ref = grad.clone()
    sparse_allreduce(ref, torch.zeros(n, dtype=torch.float64), 0.05, algorithm="topka")
    assert all(torch.equal(o, ref) for o in outs)
    assert P >= 1


def _reuse_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


# --------------------------------------------------------------------------------------
# pytest side


launch = checks_fixture(_reuse_worker, WORLD_SIZES, timeout=420)


def test_reuse_equals_no_reuse(launch):
    assert_check(launch, "equal")


def test_reuse_conservation(launch):
    assert_check(launch, "conservation")


def test_reuse_count_bounds(launch):
    assert_check(launch, "bounds")


def test_reuse_reestimation_triggers(launch):
    assert_check(launch, "triggers")


def test_reuse_parameters_validated():
    from commrt.collectives import SparseAllreduce

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="reuse_steps"):
            SparseAllreduce(0.1, reuse_steps=bad)
    for bad in (0.0, -0.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="reuse_eps"):
            SparseAllreduce(0.1, reuse_steps=2, reuse_eps=bad)
