"""Registration of the `commrt` backend: idempotent registration on import, and the
launcher detection (launches without mpirun: test_backend_launchers.py)."""
from __future__ import annotations

import torch.distributed as dist


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


def test_reduction_lookup_keys_on_the_op_hash() -> None:
    """The backend's reduction cache keys on hash(ReduceOp): c10d's ReduceOp and its
    RedOpType must hash to the op's value, or two reductions would share an entry."""
    import pytest
    import torch

    from commrt.backend.validation import REDUCTIONS, reduction

    red = dist.ReduceOp
    for kind, name in REDUCTIONS.items():
        assert hash(red(kind)) == hash(kind) == kind.value
        opts = dist.AllreduceOptions()
        opts.reduceOp = red(kind)
        dtype = torch.int32 if name.startswith("b") else torch.float64
        assert reduction(opts, dtype, "all_reduce") == (name, kind == red.AVG)
    assert reduction(None, torch.float32, "all_reduce") == ("sum", False)
    with pytest.raises(ValueError, match="not supported"):
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist._make_nccl_premul_sum(2.0)
        reduction(opts, torch.float32, "all_reduce")
    with pytest.raises(ValueError, match="bitwise"):
        opts = dist.AllreduceOptions()
        opts.reduceOp = red.BAND
        reduction(opts, torch.float32, "all_reduce")
