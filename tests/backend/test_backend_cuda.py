"""CUDA tensors through the `commrt` backend, on the staged path (pinned host buffers,
COMMRT_CUDA_AWARE=0) and on the CUDA-aware path (device pointers handed to MPI), against a
single-process float64 reference of the ranks' inputs. Skipped without CUDA; the
CUDA-aware case is also skipped when the MPI library is not CUDA-aware."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from backend_util import assert_close, init_commrt, rank_input
from harness import mpi_env, run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CUDA tensors through the backend)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cuda_worker(seed: int) -> None:
    import torch.distributed as dist

    print(f"seed {seed}", flush=True)  # a failing random case can be replayed
    init_commrt()
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    n = 1000 + 17 * size  # not a multiple of anything in particular

    def inputs(case: str, dtype: torch.dtype, shape=(n,)) -> list[torch.Tensor]:
        return [rank_input(seed, r, case, shape, dtype) for r in range(size)]

    for dtype in DTYPES:
        # all_reduce SUM and AVG, sync and async, on a non-contiguous view too
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            xs = inputs(f"ar{op}", dtype)
            expected = torch.stack([x.double() for x in xs]).sum(0)
            if op == dist.ReduceOp.AVG:
                expected /= size
            t = xs[rank].to(device, copy=True)
            dist.all_reduce(t, op=op)
            assert_close(t.cpu(), expected, f"all_reduce {op} {dtype}")
            wide = torch.stack([xs[rank], xs[rank]], 1).to(device)  # [n, 2]: a column is strided
            col = wide[:, 0]
            work = dist.all_reduce(col, op=op, async_op=True)
            work.wait()
            assert_close(wide[:, 0].cpu(), expected, f"all_reduce strided async {op} {dtype}")
            assert_close(wide[:, 1].cpu(), xs[rank].double(), "untouched column")
        # broadcast from the last rank
        xs = inputs("bc", dtype)
        t = xs[rank].to(device, copy=True)
        dist.broadcast(t, src=size - 1)
        assert_close(t.cpu(), xs[size - 1].double(), f"broadcast {dtype}")
        # all_gather_into_tensor and reduce_scatter_tensor
        xs = inputs("ag", dtype)
        out = torch.empty(size * n, dtype=dtype, device=device)
        dist.all_gather_into_tensor(out, xs[rank].to(device, copy=True))
        assert_close(out.cpu(), torch.cat(xs).double(), f"all_gather_into_tensor {dtype}")
        xs = inputs("rs", dtype, (size * n,))
        out = torch.empty(n, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(out, xs[rank].to(device, copy=True))
        full = torch.stack([x.double() for x in xs]).sum(0)
        assert_close(out.cpu(), full[rank * n:(rank + 1) * n], f"reduce_scatter_tensor {dtype}")
        # all_to_all_single, even splits
        xs = inputs("a2a", dtype, (size * n,))
        out = torch.empty(size * n, dtype=dtype, device=device)
        dist.all_to_all_single(out, xs[rank].to(device, copy=True))
        expected = torch.cat([xs[r][rank * n:(rank + 1) * n] for r in range(size)])
        assert_close(out.cpu(), expected.double(), f"all_to_all_single {dtype}")
        # point to point around a ring
        if size > 1:
            xs = inputs("p2p", dtype)
            got = torch.empty(n, dtype=dtype, device=device)
            reqs = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, xs[rank].to(device, copy=True), (rank + 1) % size),
                dist.P2POp(dist.irecv, got, (rank - 1) % size)])
            for req in reqs:
                req.wait()
            assert_close(got.cpu(), xs[(rank - 1) % size].double(), f"send/recv {dtype}")
    torch.cuda.synchronize()
    dist.destroy_process_group()
    print(f"rank {rank}: CUDA ops OK on {torch.cuda.get_device_name(device)}", flush=True)


def _mpi_is_cuda_aware() -> bool:
    probe = ("from commrt.transports import cuda_aware; print(cuda_aware())")
    env = mpi_env()
    env.pop("COMMRT_CUDA_AWARE", None)  # ask the library, not an override
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=120)
    return out.stdout.strip().endswith("True")


@pytest.mark.parametrize("nprocs", [1, 2, 3])
@pytest.mark.parametrize("path", ["staged", "cuda-aware"])
def test_backend_cuda_tensors(path: str, nprocs: int, seed: int) -> None:
    if path == "cuda-aware":
        if not _mpi_is_cuda_aware():
            pytest.skip("this MPI library is not CUDA-aware (MPIX_GPU_query_support says no)")
        env = {"COMMRT_CUDA_AWARE": "1"}
    else:
        env = {"COMMRT_CUDA_AWARE": "0"}
    out = run_ranks(_cuda_worker, nprocs, timeout=300, env=env, seed=seed)
    assert out.count("CUDA ops OK") == nprocs, out[-4000:]
