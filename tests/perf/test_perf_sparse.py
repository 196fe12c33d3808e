"""perf/bench/sparse.py runs end to end at a tiny size (so the benchmark cannot rot)."""
import json
import subprocess
import sys

from harness import REPO_ROOT, mpi_env


def test_sparse_perf_script_tiny(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "perf.bench.sparse", "--sizes", "4K", "--world-sizes", "2",
           "--links", "shm", "--algorithms", "dense,spardl,topka,quant8",
           "--densities", "0.01,0.1", "--iters", "2", "--warmup", "2", "--reuse", "3",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=mpi_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "sparse.json").read_text())
    by = {(r["algorithm"], r["density"]): r for r in records}
    assert set(by) == {("dense", None), ("spardl", 0.01), ("spardl", 0.1), ("topka", 0.01),
                       ("topka", 0.1), ("quant8", None)}
    dense = by[("dense", None)]
    assert dense["wire_bytes"] == 2 * 1 * 4096 * 4 // 2 and dense["speedup"] == 1.0
    assert by[("spardl", 0.01)]["wire_bytes"] < by[("spardl", 0.1)]["wire_bytes"] \
        < dense["wire_bytes"]
    assert all(r["time_ms"] > 0 and r["speedup"] > 0 for r in records)
    # what the time is made of: compute (the slowest rank's, outside waits) and the rest
    for r in records:
        assert 0 < r["compute_ms"] <= r["time_ms"] + 1e-9, r
        assert abs(r["wait_ms"] - (r["time_ms"] - r["compute_ms"])) < 1e-9, r
        assert 0 < r["cpu_ms"] <= 1.01 * r["time_ms"] + 0.01, r  # a thread: CPU <= wall
        assert r["link_ms"] is None and r["shm_ms"] == r["time_ms"], r    # on shm
        assert r["reuse_steps"] == 3
        if r["algorithm"] in ("dense", "quant8"):
            assert r["reused"] is None, r
        else:
            assert 0.0 <= r["reused"] <= 1.0, r
    table = (out / "sparse.md").read_text()
    assert "| compute (ms) | CPU (ms) | wait (ms) | link bytes (ms) | shm (ms) | reused |" in table
    assert "| shm | 2 | 4K | spardl | 1% |" in table
    assert (out / "sparse.png").stat().st_size > 0
