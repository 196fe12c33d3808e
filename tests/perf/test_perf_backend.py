"""perf.bench.backend: a tiny end-to-end run (the driver launches its MPI jobs through
perf.infra.launch, through --launcher, and under torchrun), the records and the markdown
table; the verdicts against the issue's targets on hand-made records."""
import json
import subprocess
import sys

import pytest
import torch

from commrt.transports import mpirun_executable
from perf.bench import backend as pb
from perf.infra.launch import REPO_ROOT, job_env


def _run(tmp_path, *extra: str) -> tuple[str, list[dict]]:
    md, js = tmp_path / "backend.md", tmp_path / "records.json"
    proc = subprocess.run(
        [sys.executable, "-m", "perf.bench.backend", "--sizes", "1k,64k",
         "--ops", "allreduce,broadcast", "--rounds", "2", "--warmup", "1", "--budget-mb", "0.25",
         "--out", str(md), "--json", str(js), *extra],
        cwd=str(REPO_ROOT), env=job_env(1), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return md.read_text(), json.loads(js.read_text())


def _check(text: str, records: list[dict], ranks: list[int], layers: bool) -> None:
    layer_impls = {"mpi4py-nb", "transport", "transport+check", "floor", "floor+check",
                   "floor+check+spin", "solo", "mpi4py+solo"}
    impls = {"mpi4py", "commrt"} | (layer_impls if layers else set())
    seen = {(r["world_size"], r["op"], r["impl"]) for r in records}
    for p in ranks:
        assert f"## {p} ranks" in text
        for op in ("allreduce", "broadcast"):
            for impl in impls:
                assert (p, op, impl) in seen, (p, op, impl)
            assert f"| {op} | 1 KiB |" in text or f"| {op} | 1020 B |" in text
    for r in records:
        assert r["time_us"] > 0 and r["cpu_us"] >= 0 and r["rounds"] == 2
        if r["impl"] != "mpi4py":
            assert r["ratio"] > 0
    assert "load average" in text and "ranks per core" in text and "cores" in text
    assert "float32, cpu tensors" in text and {r["device"] for r in records} == {"cpu"}


def test_perf_backend_tiny(tmp_path):
    text, records = _run(tmp_path, "--ranks", "2")
    _check(text, records, [2], layers=False)
    # 2 ranks: the overhead target applies at 1 KiB, neither target at 64 KiB
    row = next(line for line in text.splitlines() if line.startswith("| allreduce | 1 KiB |"))
    assert row.rstrip(" |").endswith(("ok", "MISS"))


def test_perf_backend_launcher_layers(tmp_path):
    text, records = _run(tmp_path, "--ranks", "3", "--layers", "--launcher", mpirun_executable())
    _check(text, records, [3], layers=True)
    assert "transport (us)" in text and "Python PG floor (us)" in text
    assert "floor + check overhead (us)" in text and "transport + check (us)" in text
    assert "floor + check + 7 us spin overhead (us)" in text
    assert "commrt on one rank, warm (us)" in text and "the same after the transfer (us)" in text


def test_perf_backend_launchers_compared(tmp_path):
    text, records = _run(tmp_path, "--ranks", "2", "--launchers", "mpirun,torchrun")
    _check(text, records, [2], layers=False)
    assert {r["launcher"] for r in records} == {"mpirun", "torchrun"}
    assert "## 2 ranks: launchers compared" in text and "commrt us (torchrun)" in text


def test_target_verdicts():
    def rec(p, nbytes, overhead, ratio):
        return dict(world_size=p, bytes=nbytes, overhead_us=overhead, ratio=ratio)
    assert pb.target_verdict(rec(2, 1024, 9.9, 0.2)) == "ok"
    assert pb.target_verdict(rec(2, 4096, 10.5, 0.9)) == "MISS"
    assert pb.target_verdict(rec(2, 64 << 10, 50.0, 0.5)) == ""      # between the targets
    assert pb.target_verdict(rec(2, 1 << 20, 30.0, 0.95)) == "ok"
    assert pb.target_verdict(rec(2, 4 << 20, 1.0, 0.94)) == "MISS"
    assert pb.target_verdict(rec(4, 1024, 99.0, 0.1)) == ""          # no target at 4 ranks


def test_device_flag(capsys):
    """--device cuda needs a GPU, and the layers (host-buffer floor groups) need CPU tensors:
    both refused with a message naming the problem."""
    with pytest.raises(SystemExit):
        pb.parse_args(["--device", "cuda", "--layers"])
    expected = "CPU tensors only" if torch.cuda.is_available() else "torch sees no CUDA device"
    assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pb.parse_args(["--device", "tpu"])
