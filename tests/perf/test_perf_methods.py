"""`python -m perf.bench.methods` at tiny size: every method trains, the table judges each
against DDP, and A-EDiT runs the rounds that see about DDP's tokens."""
import json
import math
import subprocess
import sys

from perf.bench.train_bench import aedit_rounds
from perf.infra.launch import REPO_ROOT, job_env


def test_perf_methods_tiny(tmp_path):
    out = tmp_path / "methods"
    steps, warmup, interval = 12, 4, 4
    proc = subprocess.run(
        [sys.executable, "-m", "perf.bench.methods", "--out", str(out), "--nprocs", "4",
         "--ranks-per-node", "2", "--link", "shm", "--topology", "flat", "--model", "tiny",
         "--steps", str(steps), "--warmup-steps", str(warmup), "--sync-interval", str(interval),
         "--eval-interval", "6", "--eval-iters", "1", "--timeout", "240"],
        cwd=str(REPO_ROOT), env=job_env(1), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    by_method = {r["method"]: r for r in summary["methods"]}
    assert list(by_method) == ["ddp", "demo", "flexdemo", "edit", "aedit"]
    ddp = by_method["ddp"]
    assert summary["target_loss"] == ddp["final_val_loss"]
    for name, r in by_method.items():
        assert r["status"] == "ok", (name, r)
        start, final = r["val_curve"][0][1], r["final_val_loss"]
        assert math.isfinite(final) and final < start, (name, r["val_curve"])
        assert math.isclose(r["loss_gap_vs_ddp"], final / ddp["final_val_loss"] - 1)
        assert r["within_3pct"] == (r["loss_gap_vs_ddp"] <= 0.03)
    assert ddp["speedup_vs_ddp"] == 1.0 and ddp["loss_gap_vs_ddp"] == 0.0
    assert by_method["aedit"]["steps"] == aedit_rounds(steps, warmup, interval) < steps
    assert 0.5 * ddp["tokens"] <= by_method["aedit"]["tokens"] <= 2 * ddp["tokens"]
    share = ddp["exposed_comm_share"]
    assert math.isclose(summary["speedup_bound"], 1 / (1 - share))
    table = (out / "table.md").read_text()
    assert "Bound on any speedup" in table and table.count("| ok |") == 5
    assert (out / "loss_vs_wall.png").stat().st_size > 1000
