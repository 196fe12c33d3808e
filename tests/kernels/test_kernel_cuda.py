"""Every Triton kernel compiled and run on a CUDA device (not Triton's interpreter), against
the torch references on fresh random inputs.

The suite's conftest turns Triton's interpreter on for the whole process, so each group
runs this file as a script in a subprocess with ``TRITON_INTERPRET=0`` and
``COMMRT_KERNELS=triton``: the kernels are compiled for the GPU, and the dispatched entry
points (``quantize``, ``scatter_add_packed_``, ...) take the Triton path too. The
subprocess gets the test's `seed` (tests/conftest.py), which a failing test's report
shows. Skipped where torch sees no CUDA device.
"""
import os
import subprocess
import sys

import pytest
import torch

GROUPS = ("topk", "topk_blocks", "error_feedback", "sparse_pack", "quantize", "dct")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the Triton kernels are compiled and run "
                                       "on a GPU only (the interpreter tests cover the logic)")


@pytest.mark.parametrize("group", GROUPS)
def test_kernel_cuda_triton_compiled(group, seed):
    env = dict(os.environ, TRITON_INTERPRET="0", COMMRT_KERNELS="triton")
    proc = subprocess.run([sys.executable, __file__, group, str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{group} failed on CUDA:\n{proc.stdout}\n{proc.stderr}"
    assert f"ok {group}" in proc.stdout


# ----------------------------------------------------------------------------------------
# The checks, run in the subprocess (CUDA tensors, compiled Triton)
# ----------------------------------------------------------------------------------------
SIZES = (1, 7, 1000, 65537, (1 << 20) + 3)
BLOCK_CASES = ((1000, 64), (65537, 4096), ((1 << 20) + 3, 256), (4096 * 64, 4096))
DEVICE = "cuda"
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}   # one rounding of a 16-bit output


def _inputs(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).add(0.1)
    if n > 100:
        x[10:20] = x[30]                                   # ties in magnitude
        x[40:50] = -x[30]
    return x.to(DEVICE, dtype)


def _check_topk(K, seed: int) -> None:
    for n in SIZES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = _inputs(n, seed + n, dtype)
            for k in sorted({0, 1, max(1, n // 100), n}):
                v, i = K.topk_magnitude_triton(x, k, exact=True)
                rv, ri = K.topk_magnitude_torch(x, k, exact=True)
                assert torch.equal(i, ri) and torch.equal(v, rv), (seed, n, dtype, k)
                v, i = K.topk_magnitude_triton(x, k, exact=False)
                assert k <= i.numel() <= K.approx_cap(k), (seed, n, dtype, k, i.numel())
                assert torch.equal(v, x[i]) and bool((i[1:] > i[:-1]).all())
                if 0 < i.numel() < n:
                    rest = torch.ones(n, dtype=torch.bool, device=DEVICE)
                    rest[i] = False
                    assert v.abs().min() >= x[rest].abs().max(), (seed, n, dtype, k)
    with_nan = _inputs(1000, seed)
    with_nan[500] = float("nan")
    try:
        K.topk_magnitude_triton(with_nan, 10)
    except ValueError:
        pass
    else:
        raise AssertionError("NaN accepted")


def _check_topk_blocks(K, seed: int) -> None:
    for n, block in BLOCK_CASES:
        x = _inputs(n, seed + n)
        for k in (1, 3, 32):
            v, i = K.topk_blocks_triton(x, block, k, exact=True)
            rv, ri = K.topk_blocks_torch(x, block, k, exact=True)
            assert torch.equal(i, ri) and torch.equal(v, rv), (seed, n, block, k)
            v, i = K.topk_blocks_triton(x, block, k, exact=False)
            assert v.numel() == ri.numel(), (seed, n, block, k)


def _check_error_feedback(K, seed: int) -> None:
    for n in SIZES[1:]:
        grad = _inputs(n, seed + n)
        residual = _inputs(n, seed + 2 * n) * 0.1
        k = max(1, n // 100)
        for exact, block in ((True, None), (False, None), (True, 64)):
            kk = min(k, 8) if block else k
            r_t, r_r = residual.clone(), residual.clone()
            v, i = K.topk_error_feedback_triton(grad, r_t, kk, exact=exact, block_size=block)
            rv, ri = K.topk_error_feedback_torch(grad, r_r, kk, exact=exact, block_size=block)
            if exact:
                assert torch.equal(i, ri) and torch.equal(v, rv), (seed, n, exact, block)
                assert torch.equal(r_t, r_r), (seed, n, exact, block)
            # the invariant: new residual + selected == grad + old residual, exactly
            rebuilt = r_t.clone()
            if block is None:
                rebuilt[i] += v
                assert torch.equal(rebuilt, grad + residual), (seed, n, exact)


def _check_sparse_pack(K, seed: int) -> None:
    for n in SIZES[1:]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = _inputs(n, seed + n, dtype)
            k = max(1, n // 50)
            values, indices = K.topk_magnitude_torch(x, k)
            buf = K.pack_sparse_triton(values, indices, n)
            ref = K.pack_sparse_torch(values, indices, n)
            assert buf.numel() == ref.numel() == K.packed_nbytes(k, dtype, n)
            v, i = K.unpack_sparse_triton(buf, dtype, n)
            rv, ri = K.unpack_sparse_torch(ref, dtype, n)
            assert torch.equal(v, rv) and torch.equal(i.long(), ri.long()), (seed, n, dtype)
            dense, dense_ref = torch.zeros_like(x), torch.zeros_like(x)
            dup = torch.cat([indices, indices[: k // 2]])         # duplicates are summed
            dup_v = torch.cat([values, values[: k // 2]])
            K.scatter_add_triton_(dense, dup, dup_v)
            K.scatter_add_torch_(dense_ref, dup, dup_v)
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
            torch.testing.assert_close(dense, dense_ref, rtol=tol, atol=tol)
            packed_sum, expect = torch.zeros_like(x), torch.zeros_like(x)
            K.scatter_add_packed_(packed_sum, [buf, buf], [0, 0], n)   # every pair twice
            K.scatter_add_torch_(expect, indices, values)
            torch.testing.assert_close(packed_sum, 2 * expect, rtol=tol, atol=tol)


def _check_quantize(K, seed: int) -> None:
    for n in SIZES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = _inputs(n, seed + n, dtype)
            for bits in (8, 4, 1):
                for block in (64, 256):
                    q = K.quantize_triton(x, bits, block)
                    r = K.quantize_torch(x, bits, block)
                    assert torch.equal(q.data, r.data), (seed, n, dtype, bits, block)
                    torch.testing.assert_close(q.scales, r.scales, rtol=1e-6, atol=0)
                    a, b = K.dequantize_triton(r), K.dequantize_torch(r)
                    assert a.dtype == dtype
                    torch.testing.assert_close(a, b, rtol=ULP.get(dtype, 1e-6), atol=0)
                    assert torch.equal(K.quantize(x, bits, block).data, r.data)  # dispatched
            residual = _inputs(n, seed + 3 * n) * 0.1
            for bits in (8, 4, 1):
                r_t, r_r = residual.clone(), residual.clone()
                q = K.quantize_triton(x, bits, 128, residual=r_t)
                r = K.quantize_torch(x, bits, 128, residual=r_r)
                assert torch.equal(q.data, r.data), (seed, n, dtype, bits, "EF")
                torch.testing.assert_close(r_t, r_r, rtol=0, atol=1e-5)
            # quantize_ (x becomes its own error) and dequantize(out=), against the
            # reference's quantize, dequantize, subtract
            for bits in (8, 4, 1):
                err = x.clone()
                q = K.quantize_triton_(err, bits, 256)
                r = K.quantize_torch(x, bits, 256)
                assert torch.equal(q.data, r.data), (seed, n, dtype, bits, "in place")
                out = torch.empty_like(x)
                K.dequantize_triton(q, out=out)
                torch.testing.assert_close(out, K.dequantize_torch(q),
                                           rtol=ULP.get(dtype, 1e-6), atol=0)
                # 16-bit: x_hat rounds to x's dtype before the subtraction (one ulp of x)
                scale = float(x.abs().max()) if n else 1.0
                torch.testing.assert_close(err, x - K.dequantize_torch(q), rtol=0,
                                           atol=ULP.get(dtype, 1e-6) * max(scale, 1.0))
    bad = _inputs(1000, seed)
    bad[999] = float("inf")
    try:
        K.quantize_triton(bad, 8, 64)
    except ValueError:
        pass
    else:
        raise AssertionError("Inf accepted")


def _check_dct(K, seed: int) -> None:
    # No Triton DCT: on CUDA the reference's cuBLAS matmuls; the fast CPU form agrees.
    gen = torch.Generator().manual_seed(seed)
    for shape, chunk in (((4096 * 3,), 64), ((256, 320), 64), ((7, 9), (4, 3))):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        c = K.dct_chunks(x.to(DEVICE), chunk)
        torch.testing.assert_close(c.cpu(), K.dct_chunks_cpu(x, chunk), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(K.idct_chunks(c).cpu(), x, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(K.dct_chunks_cpu(x.to(DEVICE), chunk).cpu(),
                                   K.dct_chunks_cpu(x, chunk), rtol=1e-10, atol=1e-10)


def _main(group: str, seed: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
    import commrt.kernels as K
    print(f"group {group}, seed {seed}, device {torch.cuda.get_device_name()}", flush=True)
    globals()[f"_check_{group}"](K, seed)
    torch.cuda.synchronize()
    print(f"ok {group}")


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
