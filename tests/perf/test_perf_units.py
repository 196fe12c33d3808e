"""perf/infra/units.py: list and size parsing and nccl-tests bus factors, against values written out
by hand and against the factors' definition on random world sizes."""
import random

import pytest

from perf.infra.units import base_op, bus_factor, comma_list, parse_size, parse_sizes


def test_perf_units_parse_size():
    assert parse_size("123") == 123
    assert parse_size("4k") == parse_size("4K") == 4096
    assert parse_size(" 1m ") == 1 << 20 and parse_size("16M") == 16 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("0.5k") == 512
    assert parse_sizes("1k,,64k, 1m") == [1024, 65536, 1 << 20]
    assert comma_list(" shm, 1GBIT,,", str.lower) == ["shm", "1gbit"]
    assert comma_list("2,3", int) == [2, 3] and comma_list("") == []
    for bad in ("", "k", "1x"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_perf_units_bus_factor():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(20):
        p = rng.randint(1, 512)
        # nccl-tests: allreduce moves 2(P-1)/P of the array per rank, the halves (P-1)/P.
        assert bus_factor("allreduce", p) == pytest.approx(2 * (p - 1) / p), seed
        for op in ("reduce_scatter", "allgather", "alltoall", "Reduce-Scatter"):
            assert bus_factor(op, p) == pytest.approx((p - 1) / p), (seed, op)
        for op in ("broadcast", "reduce", "pingpong", "sendrecv", "unknown"):
            assert bus_factor(op, p) == 1.0, (seed, op)
    assert bus_factor("allreduce", 0) == 1.0
    assert base_op("allreduce-sparse") == "allreduce"
    assert base_op("reduce_scatter") == "reduce_scatter" and base_op("Reduce") == "reduce"
