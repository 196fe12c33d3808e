"""The α–β model of perf/analysis/model.py: it recovers known coefficients and predicts held-back
configurations, on synthetic measurements drawn from the model's own formula plus noise."""
import math
import random

import pytest

from perf.analysis import model as ab


def _records(alpha_s, beta_link_s, beta_rank_s, c_s, link, world_sizes, sizes, noise, rng,
             outliers=0):
    recs = []
    for p in world_sizes:
        for nbytes in sizes:
            wire = 2 * (p - 1) / p * nbytes
            m = 2 * math.ceil(math.log2(p))
            t = c_s + alpha_s * m + beta_rank_s * wire + beta_link_s * p * wire
            t *= 1 + rng.uniform(-noise, noise)
            recs.append(dict(op="allreduce", impl="mpi4py", bench="x", link=link, world_size=p,
                             bytes=nbytes, wire_bytes=wire, time_us=t * 1e6))
    for r in rng.sample(recs, outliers):
        r["time_us"] *= 8           # a loop the scheduler delayed
    return recs


def test_perf_model_recovers_and_predicts():
    rng = random.Random(1234)
    link_bps = 1e9
    alpha, beta_link, beta_rank, c = 60e-6, 8 / link_bps, 1 / 3e9, 20e-6
    sizes = [2 ** e for e in range(3, 23, 2)]
    recs = _records(alpha, beta_link, beta_rank, c, "1gbit", [2, 3, 4, 6], sizes, 0.03, rng,
                    outliers=3)
    model = ab.fit(recs, "1gbit")
    # The bandwidth terms carry the large sizes: recovered within 10% despite the outliers.
    assert model.beta_link == pytest.approx(beta_link, rel=0.1)
    assert model.fit_rel_err < 0.05
    for kind_hold in (4, 6):
        rows = ab.held_back_check(recs, "1gbit", kind_hold)
        big = [r for r in rows if r["bytes"] >= 64 * 1024]
        assert big and all(r["rel_err"] < 0.25 for r in big), rows

    # A world size never measured, from the formula.
    p, nbytes = 16, 4 << 20
    wire = 2 * (p - 1) / p * nbytes
    truth = (c + alpha * 2 * 4 + beta_rank * wire + beta_link * p * wire) * 1e6
    predicted = model.predict_us("allreduce", p, nbytes, wire_bytes=wire)
    assert predicted == pytest.approx(truth, rel=0.15)


def test_perf_model_moves_between_link_rates():
    rng = random.Random(7)
    sizes = [2 ** e for e in range(10, 23, 2)]
    host = 1 / 2e9
    fast = _records(50e-6, 8 / 1e9, host, 0.0, "1gbit", [2, 3, 4], sizes, 0.02, rng)
    slow = _records(50e-6, 8 / 2.5e8, host, 0.0, "250mbit", [2, 3, 4], sizes, 0.02, rng)
    rows = ab.held_back_link_check(fast + slow, "1gbit", "250mbit")
    big = [r for r in rows if r["bytes"] >= 256 * 1024]
    assert big and all(r["rel_err"] < 0.25 for r in big), big
    # The wire part is swapped, the host part is kept.
    moved = ab.fit(fast, "1gbit").for_link("250mbit")
    assert moved.beta_link == pytest.approx(8 / 2.5e8, rel=0.15)
    # Per-node NICs (two-tier, one rank per node): the wire term is the per-rank one.
    nic = _records(50e-6, 0.0, 8 / 1e9, 0.0, "1gbit", [2, 3, 4], sizes, 0.02, rng)
    m = ab.fit(nic, "1gbit", shared_link=False)
    assert m.beta_rank == pytest.approx(8 / 1e9, rel=0.1)
    assert m.for_link("100mbit").beta_rank == pytest.approx(8 / 1e8, rel=0.1)
    with pytest.raises(ValueError):
        m.for_link("shm")


def test_perf_model_fit_all():
    rng = random.Random(3)
    sizes = [2 ** e for e in range(10, 21, 2)]
    recs = _records(40e-6, 8 / 1e9, 0.0, 0.0, "1gbit", [2, 3, 4], sizes, 0.02, rng)
    held = _records(40e-6, 8 / 5e8, 0.0, 0.0, "500mbit", [2, 3, 4], sizes, 0.02, rng)
    fits = ab.fit_all(recs + held, holdout_links=["500mbit"])
    assert list(fits) == [("x", "allreduce", "mpi4py", "1gbit", None)]
    kinds = {c["check"] for c in fits[("x", "allreduce", "mpi4py", "1gbit", None)]["checks"]}
    assert kinds == {"interpolate", "extrapolate", "link 1gbit->500mbit"}
    with pytest.raises(ValueError):
        ab.fit(recs[:1], "1gbit")
    with pytest.raises(ValueError):
        ab.held_back_check(recs, "1gbit", 7)
