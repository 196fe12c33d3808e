"""Fused error feedback (commrt.kernels.topk_error_feedback): selected + new residual ==
grad + old residual exactly, Triton (interpreter) == fast CPU == torch reference, NaN/Inf,
bad input."""
import numpy as np
import pytest
import torch
from references import stable_topk_indices

import commrt.kernels as K
from commrt.kernels import topk_cpu as topk_mod

FNS = {"triton": K.topk_error_feedback_triton, "torch": K.topk_error_feedback_torch,
       "cpu": K.topk_error_feedback_cpu}


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (7, 3), (1000, 17), (2500, 0),
                                 (2500, 250), (2500, 2500)])
@pytest.mark.parametrize("exact", [True, False])
def test_kernel_error_feedback_invariant(backend, n, k, exact):
    gen = torch.Generator().manual_seed(n + 7 * k)
    grad = torch.randn(n, generator=gen)
    residual = torch.randn(n, generator=gen) * 0.5
    x = grad + residual
    values, indices = FNS[backend](grad, residual, k, exact=exact)
    rebuilt = residual.clone()
    rebuilt[indices] += values
    assert torch.equal(rebuilt, x)                      # exact, not approximately
    assert torch.all(residual[indices] == 0)
    assert torch.equal(values, x[indices])
    if exact:
        np.testing.assert_array_equal(indices.numpy(), stable_topk_indices(x, k))
    else:
        assert k <= indices.numel() <= K.approx_cap(k)


@pytest.mark.parametrize("grad_dtype,res_dtype", [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16),
                                                  (torch.float64, torch.float64)])
def test_kernel_error_feedback_triton_equals_reference(grad_dtype, res_dtype):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(1800, generator=gen).to(grad_dtype)
    residual = torch.randn(1800, generator=gen).to(res_dtype)
    for exact in (True, False):
        r1, r2 = residual.clone(), residual.clone()
        v1, i1 = K.topk_error_feedback_triton(grad, r1, 90, exact=exact)
        v2, i2 = K.topk_error_feedback_torch(grad, r2, 90, exact=exact)
        assert torch.equal(i1, i2) and torch.equal(v1, v2) and torch.equal(r1, r2)
        assert v1.dtype == res_dtype
        rebuilt = r1.clone()
        rebuilt[i1] += v1
        assert torch.equal(rebuilt, grad.to(res_dtype) + residual)


def test_kernel_error_feedback_blocks_and_2d_shape():
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(30, 40, generator=gen)          # flattened row-major
    residual = torch.randn(30, 40, generator=gen)
    x = (grad + residual).reshape(-1)
    r1, r2 = residual.clone(), residual.clone()
    v1, i1 = K.topk_error_feedback_triton(grad, r1, 6, block_size=256)
    v2, i2 = K.topk_error_feedback_torch(grad, r2, 6, block_size=256)
    assert torch.equal(i1, i2) and torch.equal(v1, v2) and torch.equal(r1, r2)
    num_blocks = (1200 + 255) // 256
    assert i1.numel() == 6 * num_blocks
    glob = torch.arange(num_blocks).repeat_interleave(6) * 256 + i1
    rebuilt = r1.reshape(-1).clone()
    rebuilt[glob] += v1
    assert torch.equal(rebuilt, x)
    for b in range(num_blocks):
        expect = stable_topk_indices(x[b * 256:(b + 1) * 256], 6)
        np.testing.assert_array_equal(i1[6 * b:6 * b + 6].numpy(), expect)


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
def test_kernel_error_feedback_nan_inf_leaves_residual(backend):
    for bad in (float("nan"), float("inf")):
        grad = torch.randn(500)
        grad[77] = bad
        residual = torch.randn(500)
        before = residual.clone()
        with pytest.raises(ValueError, match="NaN or Inf"):
            FNS[backend](grad, residual, 5)
        assert torch.equal(residual, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kernel_error_feedback_cpu_nan_inf_late_leaves_residual(bad, monkeypatch):
    # The bad entry sits in the last of many chunks: the residual must still be untouched.
    monkeypatch.setattr(topk_mod, "CPU_CHUNK", 4096)
    grad = torch.randn(100_000)
    residual = torch.randn(100_000)
    residual[99_998] = bad
    before = residual.clone()
    for k, block_size in ((1000, None), (0, None), (20, 5000)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            K.topk_error_feedback_cpu(grad, residual, k, block_size=block_size)
        assert torch.equal(residual.view(torch.int32), before.view(torch.int32))   # bitwise


@pytest.mark.parametrize("grad_dtype,res_dtype", [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.float64, torch.float32),
                                                  (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.bfloat16),
                                                  (torch.float64, torch.float64)])
def test_kernel_error_feedback_cpu_equals_reference_fresh(grad_dtype, res_dtype, monkeypatch, seed):
    # Large enough for the sampled threshold and several chunks; flat and blocks; the
    # missed-sample fallback too (negative margin). Values, indices and the new residual
    # equal the reference's bit for bit.
    gen = torch.Generator().manual_seed(seed)
    n = 300_007
    grad = torch.randn(n, generator=gen).to(grad_dtype)
    residual = (torch.randn(n, generator=gen) * 0.3).to(res_dtype)
    for z in (4.0, -30.0):
        monkeypatch.setattr(topk_mod, "CPU_SAMPLE_Z", z)
        for k, exact, block_size in ((3000, True, None), (3000, False, None), (1, True, None),
                                     (40, True, 4096), (700, False, 70_000), (n, True, None)):
            r1, r2 = residual.clone(), residual.clone()
            v1, i1 = K.topk_error_feedback_cpu(grad, r1, k, exact=exact, block_size=block_size)
            v2, i2 = K.topk_error_feedback_torch(grad, r2, k, exact=True, block_size=block_size)
            msg = f"seed {seed}, k={k}, exact={exact}, block_size={block_size}, z={z}"
            assert v1.dtype == res_dtype, msg
            if exact or block_size is not None:
                assert torch.equal(i1, i2) and torch.equal(v1, v2), msg
                assert torch.equal(r1, r2), msg
            else:
                assert k <= i1.numel() <= K.approx_cap(k), msg
            x = (grad.to(res_dtype) + residual)
            rebuilt = r1.clone()
            glob = i1 if block_size is None else i1 + block_size * torch.repeat_interleave(
                torch.arange(-(-n // block_size)), min(k, block_size))[:i1.numel()]
            rebuilt[glob] += v1
            assert torch.equal(rebuilt, x) and torch.all(r1[glob] == 0), msg


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_error_feedback_cpu_non_contiguous_grad(threads, monkeypatch, seed):
    # Small chunks: many segments, run on two threads (each with its own x buffer).
    monkeypatch.setattr(topk_mod, "CPU_CHUNK", 5000)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(300, 400, generator=gen).t()            # non-contiguous
    residual = torch.randn(400, 300, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, block_size in ((500, None), (30, 4096)):
            r1, r2 = residual.clone(), residual.clone()
            v1, i1 = K.topk_error_feedback_cpu(grad, r1, k, block_size=block_size)
            v2, i2 = K.topk_error_feedback_torch(grad, r2, k, block_size=block_size)
            assert torch.equal(i1, i2) and torch.equal(v1, v2), f"seed {seed}"
            assert torch.equal(r1, r2), f"seed {seed}"
    finally:
        torch.set_num_threads(before)


def test_kernel_error_feedback_wrong_input():
    g, r = torch.randn(10), torch.randn(10)
    with pytest.raises(ValueError, match="shape"):
        K.topk_error_feedback(g, torch.randn(11), 2)
    with pytest.raises(ValueError, match="float"):
        K.topk_error_feedback(g, torch.zeros(10, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="float"):
        K.topk_error_feedback(torch.zeros(10, dtype=torch.int64), r, 2)
    with pytest.raises(ValueError, match="out of range"):
        K.topk_error_feedback(g, r, 11)
    with pytest.raises(ValueError, match="out of range"):
        K.topk_error_feedback(g, r, -1)
    with pytest.raises(ValueError, match="contiguous"):
        K.topk_error_feedback(torch.randn(5, 4).t(), torch.randn(5, 4).t(), 2)
    meta = torch.randn(10, device="meta")
    with pytest.raises(ValueError, match="device"):
        K.topk_error_feedback(g, meta, 2)
