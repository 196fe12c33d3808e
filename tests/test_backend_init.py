"""Registration and initialisation of the `commrt` backend: idempotent registration on
import, the launcher detection, and a torchrun launch failing at once with a one-line
message that says to use mpirun."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch.distributed as dist

from mpi_harness import REPO_ROOT, mpi_env


def test_backend_registered_on_import_and_idempotent() -> None:
    import commrt  # noqa: F401
    import commrt.backend as backend

    assert "COMMRT" in dist.Backend._plugins
    assert dist.Backend._plugins["COMMRT"].extended_api
    backend.register()  # a second registration is a no-op, not torch's "already registered"
    backend.register()
    assert dist.Backend.backend_capability["commrt"] == ["cpu", "cuda"]


def test_backend_launcher_detection(monkeypatch) -> None:
    from commrt.backend import launched_by_mpi
    from commrt.transports.agreement import debug_detail

    for key in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                "PMIX_RANK", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_mpi()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_by_mpi()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMI_RANK", "0")
    assert launched_by_mpi()
    # the agreement switch is torch's: DETAIL blocks before each collective
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG", raising=False)
    assert not debug_detail()
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "INFO")
    assert not debug_detail()
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "detail")
    assert debug_detail()


def test_backend_under_torchrun_fails_with_one_line(tmp_path) -> None:
    script = tmp_path / "init_commrt.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        import commrt.backend  # noqa: F401
        try:
            dist.init_process_group("commrt")
        except RuntimeError as exc:
            print("COMMRT-ERROR:", str(exc), flush=True)
            raise SystemExit(3)
        print("initialised", flush=True)
    """))
    env = {k: v for k, v in mpi_env().items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "HYDRA_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)], capture_output=True, text=True, timeout=180, env=env, cwd=str(REPO_ROOT))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # both ranks fail at init_process_group (their lines may interleave)
    assert out.count("COMMRT-ERROR:") == 2, out
    assert out.count("launch with `mpirun -n 2 python ...` instead") == 2, out
    assert "initialised" not in out
