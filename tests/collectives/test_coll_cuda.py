"""The compressed allreduces on CUDA tensors: sparse_allreduce (dense, TopkA, gTopk, SparDL)
and quantized_allreduce (8 and 1 bit) under mpirun, against single-process float64
references of every rank's inputs, on fresh random inputs.

The same worker runs on CPU tensors too (``device="cpu"``): that case checks the checks
themselves on machines without a GPU; the CUDA case skips without one. Checked per
algorithm: density 1 (sparse) gives the exact mean; conservation
Σ residual_after + P·result == Σ (tensor + residual) at density 0.1 and for the quantized
reductions; every rank holds the same result; results and residuals stay on the device.
"""
import pytest
import torch
from harness import gather_rows, generator, run_ranks

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _cuda_collectives_worker(seed: int, device: str) -> None:
    from commrt import transports as T
    from commrt.collectives import quantized_allreduce, sparse_allreduce

    print(f"seed {seed}", flush=True)  # a failing random case can be replayed
    comm = T.world()
    P, rank = comm.size, comm.rank
    dev = torch.device("cpu") if device == "cpu" else \
        torch.device("cuda", rank % torch.cuda.device_count())

    def inputs(case, n, dtype):
        g = generator(seed, case, n, rank)
        tensor = torch.randn(n, generator=g, dtype=torch.float64)
        residual = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        return tensor.to(dtype).to(dev), residual.to(dtype).to(dev)

    def rows(t):  # every rank's t, (P, n) float64 on the CPU
        return gather_rows(comm, t.detach().cpu())

    def check(name, tensor, residual, total_in, tol):
        assert tensor.device == dev and residual.device == dev, f"{name}: left {dev}"
        results = rows(tensor)
        assert torch.equal(results.min(0).values, results.max(0).values), \
            f"{name}: ranks hold different results"
        gap = (rows(residual).sum(0) + P * results[0] - total_in).abs().max().item()
        assert gap < tol, f"{name}: conservation off by {gap}"

    for alg in ("dense", "topka", "gtopk", "spardl"):
        # density 1 (dense: any density) is the exact mean of tensor + residual
        tensor, residual = inputs(f"exact {alg}", 257, torch.float64)
        expected = rows(tensor + residual).mean(0)
        sparse_allreduce(tensor, residual, 0.05 if alg == "dense" else 1.0, algorithm=alg)
        err = (tensor.cpu() - expected).abs().max().item()
        assert err < 1e-12, f"{alg} on {dev}: |result - mean| = {err}"
        # density 0.1, float32: nothing lost, the residual keeps what was not sent
        tensor, residual = inputs(f"sparse {alg}", 1000, torch.float32)
        total_in = rows(tensor.double() + residual.double()).sum(0)
        sparse_allreduce(tensor, residual, 0.1, algorithm=alg)
        check(f"{alg} on {dev}", tensor, residual, total_in, 1e-4)
    for bits in (8, 1):
        tensor, residual = inputs(f"quantized {bits}", P * 512, torch.float32)
        total_in = rows(tensor.double() + residual.double()).sum(0)
        quantized_allreduce(tensor, residual, bits)
        check(f"{bits}-bit quantized on {dev}", tensor, residual, total_in, 1e-4)
    print(f"rank {rank}: compressed allreduces OK on {dev}", flush=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nprocs", [2, 3])
def test_coll_compressed_allreduce_on_device(device: str, nprocs: int, seed: int) -> None:
    # On a GPU the Triton kernels are compiled (the suite's default is the interpreter).
    env = {"TRITON_INTERPRET": "0"} if device == "cuda" else None
    out = run_ranks(_cuda_collectives_worker, nprocs, timeout=300, env=env, seed=seed,
                    device=device)
    assert out.count("compressed allreduces OK") == nprocs, out[-4000:]
