"""sparse_allreduce (SparDL, TopkA, gTopk, dense) under mpirun at 2, 3, 4, 5, 6 and 8 ranks.

One launch per world size runs every check (launches are expensive on 2 cores); each rank
prints ``CHECK <name> rank <r> OK|FAIL`` and the test functions below each assert one
concept from those lines:

- exact:        density 1 (every algorithm, every team count) and "dense" == the dense
                mean of tensor + residual computed in float64 from every rank's input;
- conservation: Σ residual_after + P·result == Σ (tensor + residual), float64, every
                algorithm, team count (divisors of P), both SAG variants; all ranks agree;
                spar_reduce_scatter's own conservation and ownership;
- convergence:  the applied total under a repeated identical gradient approaches the
                dense total (error feedback works), error shrinking with the steps;
- wire_bytes:   transport counters against the per-rank formulas, SparDL messages
                per rank = ⌈log2 m⌉ per phase;
- bad_input:    clear ValueError on every rank, no hang, then a valid call still works;
- empty:        empty tensors are a no-op and send nothing.
"""
import math

import pytest
import torch
from harness import assert_check, checks_fixture, gather_rows, generator, run_checks

WORLD_SIZES = [2, 3, 4, 5, 6, 8]
CHECKS = ["exact", "conservation", "convergence", "wire_bytes", "bad_input", "empty"]


# --------------------------------------------------------------------------------------
# worker side


def _configs(P):
    """(algorithm, teams, sag) for every algorithm, team count and SAG variant."""
    out = [("dense", 1, "bruck"), ("topka", 1, "bruck"), ("gtopk", 1, "bruck")]
    for d in range(1, P + 1):
        if P % d == 0:
            out.append(("spardl", d, "bruck"))
            if d > 1 and d & (d - 1) == 0:
                out.append(("spardl", d, "recursive"))
    return out


def _inputs(comm, seed, n, case, dtype=torch.float64):
    g = generator(seed, "inputs", case, comm.rank)
    tensor = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    residual = (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    return tensor, residual


def _check_exact(comm, seed):
    from commrt.collectives import sparse_allreduce

    P = comm.size
    for i, (alg, teams, sag) in enumerate(_configs(P)):
        for n in (1, 29, 200):
            tensor, residual = _inputs(comm, seed, n, 10 + i)
            expected = gather_rows(comm, tensor + residual).mean(0)
            density = 0.05 if alg == "dense" else 1.0
            sparse_allreduce(tensor, residual, density, algorithm=alg, teams=teams, sag=sag)
            err = (tensor - expected).abs().max().item()
            assert err < 1e-12, f"{alg} teams={teams} {sag} n={n}: |result - mean| = {err}"
            assert residual.abs().max().item() < 1e-12, f"{alg}: residual not zero at ρ=1"
    # float32 (the usual gradient dtype) at density 1
    tensor, residual = _inputs(comm, seed, 100, 3, torch.float32)
    expected = gather_rows(comm, tensor.double() + residual.double()).mean(0)
    sparse_allreduce(tensor, residual, 1.0, teams=1)
    assert (tensor.double() - expected).abs().max().item() < 1e-5


def _check_conservation(comm, seed):
    from commrt.collectives import SparseAllreduce, spar_reduce_scatter

    P = comm.size
    for i, (alg, teams, sag) in enumerate(_configs(P)):
        reducer = SparseAllreduce(0.1, alg, teams=teams, sag=sag)
        for step, n in enumerate((1, 7, 97, 1000)):
            tensor, residual = _inputs(comm, seed, n, 100 * i + step)
            total_in = gather_rows(comm, tensor + residual).sum(0)
            reducer(tensor, residual)
            results = gather_rows(comm, tensor)
            residuals = gather_rows(comm, residual)
            assert torch.equal(results.min(0).values, results.max(0).values), \
                f"{alg} teams={teams}: ranks hold different results"
            gap = (residuals.sum(0) + P * tensor - total_in).abs().max().item()
            assert gap < 1e-11, f"{alg} teams={teams} {sag} n={n}: conservation off by {gap}"
            if alg != "dense" and n >= 97:
                nnz = int((tensor != 0).sum())
                assert nnz < n, f"{alg}: result not sparse ({nnz} of {n})"
        if alg == "spardl" and teams > 1:
            # the same call site again: h adapted, still conserving
            tensor, residual = _inputs(comm, seed, 1000, 7)
            total_in = gather_rows(comm, tensor + residual).sum(0)
            reducer(tensor, residual)
            gap = (gather_rows(comm, residual).sum(0) + P * tensor - total_in).abs().max().item()
            assert gap < 1e-11, f"spardl teams={teams} second call: off by {gap}"
    # spar_reduce_scatter on its own: ownership and conservation inside each team
    for teams in (1, P) if P > 1 else (1,):
        m = P // teams
        x, _ = _inputs(comm, seed, 53, 77)
        out = spar_reduce_scatter(x, 0.2, teams=teams)
        c = math.ceil(53 / m)
        xs = gather_rows(comm, torch.nn.functional.pad(x, (0, m * c - 53)))
        dropped = gather_rows(comm, out.dropped)
        owned = torch.zeros(P, m * c, dtype=torch.float64)
        owned[comm.rank, out.block_index * c:(out.block_index + 1) * c] = out.block
        owned = gather_rows(comm, owned.sum(0))
        assert out.block_index == comm.rank % m
        for t in range(teams):
            team = slice(t * m, (t + 1) * m)
            gap = (dropped[team].sum(0) + owned[team].sum(0) - xs[team].sum(0)).abs().max()
            assert gap.item() < 1e-12, f"spar_reduce_scatter teams={teams}: off by {gap}"


def _check_convergence(comm, seed):
    from commrt.collectives import SparseAllreduce

    P = comm.size
    n = 120
    g = generator(seed, "convergence", comm.rank)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    dense_mean = gather_rows(comm, grad).mean(0)
    teams = 2 if P % 2 == 0 else P
    for alg, t in (("spardl", 1), ("spardl", teams), ("topka", 1), ("gtopk", 1)):
        reducer = SparseAllreduce(0.2, alg, teams=t)
        residual = torch.zeros(n, dtype=torch.float64)
        applied = torch.zeros(n, dtype=torch.float64)
        errors = {}
        for step in range(1, 61):
            tensor = grad.clone()
            reducer(tensor, residual)
            applied += tensor
            if step in (15, 60):
                errors[step] = ((applied - step * dense_mean).norm()
                                / (step * dense_mean).norm()).item()
        # exact conservation makes the error ‖Σ residual‖/(P·T·‖mean‖): it must fall ~1/T
        assert errors[60] < 0.3, f"{alg} teams={t}: relative error {errors[60]:.3f} after 60"
        assert errors[60] < 0.5 * errors[15], f"{alg} teams={t}: error not shrinking {errors}"


def _pair_bytes(count, n_block):
    from commrt.collectives import local_ops as KK

    return KK.pair_nbytes(count, torch.float32, n_block)


def _check_wire_bytes(comm, seed):
    from commrt import transports as T
    from commrt.collectives import SparseAllreduce
    from commrt.collectives.schedules import (
        bruck_allgather_schedule,
        ceil_log2,
        spardl_block_schedule,
    )

    P, rank = comm.size, comm.rank
    n, density = 4000, 0.01
    word = 4
    for alg, teams, sag in _configs(P):
        reducer = SparseAllreduce(density, alg, teams=teams, sag=sag)
        for step in range(2):        # the second call uses the adapted h
            tensor, residual = _inputs(comm, seed, n, 5 + step, torch.float32)
            before = T.wire.snapshot()
            reducer(tensor, residual)
            delta = T.snapshot_delta(T.wire.snapshot(), before)
            info = reducer.last
            if alg == "dense":
                assert delta == {"dense.all_reduce": (2 * (P - 1) * n * 4 // P, 1)}, delta
            elif alg == "topka":
                k = info["k"]
                expect = (P - 1) * P * _pair_bytes(k, n) // P
                assert delta == {"topka.all_gather": (expect, 1)}, delta
                # docs/design.md §5: 2(P-1)k words, plus the 8-byte header and alignment per rank
                assert expect <= 2 * (P - 1) * k * word + (P - 1) * 11
            elif alg == "gtopk":
                k = info["k"]
                p2 = 1 << (P.bit_length() - 1)
                msgs = ceil_log2(p2) if rank < p2 else 1
                msgs += 1 if rank < P - p2 else 0
                assert delta == {"gtopk": (msgs * _pair_bytes(k, n), msgs)}, delta
                if P == p2:   # docs/design.md §5: 2k·log2 P words (+ header per message)
                    assert msgs * _pair_bytes(k, n) <= 2 * k * word * ceil_log2(P) + 11 * msgs
            else:
                m, d, c, kb = P // teams, teams, info["c"], info["k_block"]
                rs = sum(_pair_bytes(s * kb, c) for _, s in spardl_block_schedule(m))
                ag = sum(_pair_bytes(items * kb, c) + 4 * items
                         for _, items in bruck_allgather_schedule(m))
                expect = {}
                if m > 1:
                    expect["spardl.reduce_scatter"] = (rs, ceil_log2(m))
                    expect["spardl.all_gather"] = (ag, ceil_log2(m))
                if d > 1:
                    h = info["h"]
                    if sag == "bruck":
                        sets = [items for _, items in bruck_allgather_schedule(d)]
                    else:
                        sets = [1 << j for j in range(ceil_log2(d))]
                    expect["spardl.sag"] = (sum(_pair_bytes(s * h, c) for s in sets),
                                            ceil_log2(d))
                assert delta == expect, f"spardl teams={teams} {sag}: {delta} != {expect}"
                if d == 1:
                    # docs/design.md §5: at most 4k(P-1)/P words (k = m·k_b), plus per message an
                    # 8-byte header + alignment and 4 count bytes per all-gathered block
                    bound = 4 * m * kb * (P - 1) // P * word + 11 * 2 * ceil_log2(m) + 4 * (m - 1)
                    assert rs + ag <= bound, (rs, ag, bound)


def _expect_error(comm, fn, *needles):
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        assert any(s in msg for s in needles), f"unclear error message: {msg!r}"
        return
    raise AssertionError(f"no ValueError on rank {comm.rank} (expected {needles})")


def _check_bad_input(comm, seed):
    from commrt.collectives import SparseAllreduce, quantized_allreduce, sparse_allreduce

    P, rank = comm.size, comm.rank
    t, r = _inputs(comm, seed, 50, 1)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        _expect_error(comm, lambda bad=bad: sparse_allreduce(t.clone(), r.clone(), bad),
                      "density")
    with pytest.raises(ValueError, match="density"):
        SparseAllreduce(2.0)
    # a bad density on one rank only
    dens = 3.0 if rank == 0 else 0.1
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), r.clone(), dens),
                  "density", "another rank")
    # residual of another shape / dtype on the last rank only, then on all
    res = r[:-1].clone() if rank == P - 1 else r.clone()
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), res, 0.1), "residual",
                  "another rank")
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), r.float(), 0.1), "residual")
    # teams not dividing P, R-SAG with a non power of two, unknown algorithm
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), r.clone(), 0.1, teams=P + 1),
                  "teams")
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), r.clone(), 0.1, teams=3,
                                                 sag="recursive"), "power-of-two")
    _expect_error(comm, lambda: sparse_allreduce(t.clone(), r.clone(), 0.1, algorithm="x"),
                  "algorithm")
    # sizes differing across ranks
    m = 51 if rank == 0 else 50
    ta, ra = _inputs(comm, seed, m, 2)
    for alg in ("spardl", "topka", "gtopk", "dense"):
        _expect_error(comm, lambda alg=alg: sparse_allreduce(ta, ra, 0.1, algorithm=alg),
                      "differ", "another rank")
    # dtype differing across ranks
    dt = torch.float32 if rank == 0 else torch.float64
    _expect_error(comm, lambda: sparse_allreduce(t.to(dt), r.to(dt), 0.1), "differ")
    # the quantized allreduce too
    _expect_error(comm, lambda: quantized_allreduce(t.clone(), r.clone(), 3), "bits")
    bits = 2 if rank == 0 else 8
    _expect_error(comm, lambda: quantized_allreduce(t.clone(), r.clone(), bits),
                  "bits", "another rank")
    _expect_error(comm, lambda: quantized_allreduce(ta, ra, 8), "differ", "another rank")
    _expect_error(comm, lambda: quantized_allreduce(t.clone(), res, 8), "residual",
                  "another rank")
    # nothing is left half-done: a valid call still gives the right answer
    expected = gather_rows(comm, t + r).mean(0)
    tensor, residual = t.clone(), r.clone()
    sparse_allreduce(tensor, residual, 1.0)
    assert (tensor - expected).abs().max().item() < 1e-12


def _check_empty(comm, seed):
    from commrt import transports as T
    from commrt.collectives import quantized_allreduce, sparse_allreduce

    P = comm.size
    for alg, teams, sag in _configs(P):
        for shape in ((0,), (3, 0)):
            tensor = torch.empty(shape)
            residual = torch.empty(shape)
            before = T.wire.snapshot()
            out = sparse_allreduce(tensor, residual, 0.1, algorithm=alg, teams=teams, sag=sag)
            assert out is tensor and out.shape == shape
            assert T.snapshot_delta(T.wire.snapshot(), before) == {}, "bytes sent for nothing"
    before = T.wire.snapshot()
    quantized_allreduce(torch.empty(0), torch.empty(0), 8)
    assert T.snapshot_delta(T.wire.snapshot(), before) == {}


def _sparse_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


# --------------------------------------------------------------------------------------
# pytest side


launch = checks_fixture(_sparse_worker, WORLD_SIZES, timeout=420)


def test_sparse_exact_dense_mean(launch):
    assert_check(launch, "exact")


def test_sparse_conservation(launch):
    assert_check(launch, "conservation")


def test_sparse_error_feedback_convergence(launch):
    assert_check(launch, "convergence")


def test_sparse_wire_bytes(launch):
    assert_check(launch, "wire_bytes")


def test_sparse_bad_input(launch):
    assert_check(launch, "bad_input")


def test_sparse_empty_noop(launch):
    assert_check(launch, "empty")
