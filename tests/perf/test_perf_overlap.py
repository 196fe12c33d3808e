"""perf/bench/overlap.py runs end to end at a tiny size (so the benchmark cannot rot), and its
records obey the wire formula and DDP's equivalence with ZeRO-1."""
import json
import subprocess
import sys

from harness import REPO_ROOT, mpi_env


def test_overlap_perf_script_tiny(tmp_path):
    from commrt.model import build_gpt, preset

    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "perf.bench.overlap", "--nprocs", "2", "--links", "shm",
           "--steps", "2", "--warmup", "1", "--methods", "ddp", "zero1", "--no-memory",
           "--out", str(out), "--json", str(tmp_path / "runs.json")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=mpi_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((out / "overlap.json").read_text())
    assert runs == json.loads((tmp_path / "runs.json").read_text())
    (run,) = runs
    assert run["nprocs"] == 2 and run["link"] == "shm"
    ddp, zero1 = run["methods"]["ddp"], run["methods"]["zero1"]
    model = build_gpt(preset("tiny", n_layer=4, n_embd=64, block_size=64), seed=0)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per step: one all-reduce of the flat float32 gradient, 2(P-1)/P * 4n bytes; ZeRO-1's
    # reduce-scatter + all-gather move the same bytes
    assert ddp["wire_B"] == 2 * 1 * 4 * n // 2
    assert abs(zero1["wire_B"] - ddp["wire_B"]) <= 8 * 2
    # the same optimizer on the same micro-batches: the same validation loss
    assert abs(ddp["val_loss"] - zero1["val_loss"]) < 1e-4
    for m in (ddp, zero1):
        assert 0 < m["compute_s"] <= m["step_s"] and m["exposed_s"] >= 0
    table = (out / "overlap.md").read_text()
    assert "| ddp |" in table and "| zero1 |" in table and (out / "overlap.png").exists()
