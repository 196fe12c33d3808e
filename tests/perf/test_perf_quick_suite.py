"""`python -m perf run quick --tiny` end to end: every job it can run succeeds and the
results folder holds the records, the report with its sections, and the plots."""
import json
import subprocess
import sys

from perf.infra import netem
from perf.infra.launch import REPO_ROOT, job_env
from perf.infra.units import bus_factor


def test_perf_quick_suite_tiny(tmp_path):
    out = tmp_path / "quick"
    links = "shm,1gbit"
    proc = subprocess.run(
        [sys.executable, "-m", "perf", "run", "quick", "--tiny", "--nprocs", "2,3", "--link", links,
         "--out", str(out)],
        cwd=str(REPO_ROOT), env=job_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    shaped_ok = netem.link_unavailable_reason() is None
    assert run["links"] == (["shm", "1gbit"] if shaped_ok else ["shm"])
    if not shaped_ok:
        assert "1gbit" in run["links_skipped"] and "shm only" in proc.stdout
    bad = [j for j in run["jobs"] if j["status"] != "ok"
           and not (j["status"] == "skipped" and "not present" in j.get("error", ""))]
    assert not bad, bad

    records = json.loads((out / "records.json").read_text())
    raw = [r for r in records if r.get("bench") == "mpi-raw"]
    seen = {(r["op"], r["link"], r["world_size"]) for r in raw}
    for link in run["links"]:
        for p in (2, 3):
            assert ("allreduce", link, p) in seen
    for r in raw:
        assert r["time_us"] > 0 and r["bytes"] > 0
        factor = bus_factor(r["op"], r["world_size"])
        assert abs(r["busbw_gbps"] - r["algbw_gbps"] * factor) <= 1e-9 + 1e-6 * r["busbw_gbps"]
        assert abs(r["algbw_gbps"] - r["bytes"] / r["time_us"] / 1e3) <= 1e-6 * r["algbw_gbps"]

    report = (out / "report.md").read_text()
    for section in ("## Jobs", "## Collective sweeps (nccl-tests form)", "## α–β model",
                    "| size | count | type | impl | time(us) | algbw(GB/s) | busbw(GB/s) "
                    "| wire/rank |"):
        assert section in report, section
    if shaped_ok:
        assert "link 1gbit->500mbit" in report          # the held-out rate was predicted
    plots = list((out / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 for p in plots)
    for p in plots:
        assert f"plots/{p.name}" in report
    sparse_ok = any(j["module"] == "perf.bench.sparse" and j["status"] == "ok"
                    for j in run["jobs"])
    if sparse_ok and shaped_ok:
        assert "SparDL (spardl rho=0.01) speedup over dense allreduce, 3 ranks, 1gbit" in report
    # The report is rebuilt from the JSON alone.
    (out / "report.md").unlink()
    subprocess.run([sys.executable, "-m", "perf", "report", str(out)], check=True,
                   cwd=str(REPO_ROOT), env=job_env(1), capture_output=True, timeout=120)
    assert (out / "report.md").read_text() == report
