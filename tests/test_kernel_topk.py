"""Top-k by magnitude (commrt.kernels.topk): Triton (interpreter) vs torch reference vs an
independent numpy stable-sort reference; approximate-mode tolerance; ties; NaN/Inf; errors."""
import math

import numpy as np
import pytest
import torch

import commrt.kernels as K
from commrt.kernels import topk as topk_mod

BACKENDS = {
    "triton": (K.topk_magnitude_triton, K.topk_blocks_triton),
    "torch": (K.topk_magnitude_torch, K.topk_blocks_torch),
}


def stable_topk_indices(x: torch.Tensor, k: int) -> np.ndarray:
    """Exact top-k by |x| with ties to the lower index, ascending (float64, numpy)."""
    a = x.double().abs().numpy()
    return np.sort(np.argsort(-a, kind="stable")[:k])


def blocks_reference(x: torch.Tensor, block_size: int, k: int) -> np.ndarray:
    out = []
    for start in range(0, x.numel(), block_size):
        out.append(stable_topk_indices(x[start:start + block_size], min(k, block_size)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (7, 3), (1000, 1), (1000, 10),
                                 (3001, 150), (3001, 3001)])
def test_kernel_topk_exact_matches_stable_sort(backend, n, k):
    fn = BACKENDS[backend][0]
    gen = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(n, generator=gen)
    values, indices = fn(x, k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    np.testing.assert_array_equal(indices.numpy(), stable_topk_indices(x, k))
    assert torch.equal(values, x[indices])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernel_topk_triton_equals_reference_all_dtypes(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1500, generator=gen).to(dtype)
    for exact in (True, False):
        for k in (0, 37, 600, 1500):
            v1, i1 = K.topk_magnitude_triton(x, k, exact=exact)
            v2, i2 = K.topk_magnitude_torch(x, k, exact=exact)
            assert torch.equal(i1, i2) and torch.equal(v1, v2), (exact, k)
            if exact:
                np.testing.assert_array_equal(i1.numpy(), stable_topk_indices(x, k))


def test_kernel_topk_ties_go_to_lower_index():
    # Many equal magnitudes of both signs: 16-bit values with few distinct levels.
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (2000,), generator=gen).float()
    for k in (1, 5, 290, 1000, 1999):
        for fn in (K.topk_magnitude_triton, K.topk_magnitude_torch):
            _, idx = fn(x, k)
            np.testing.assert_array_equal(idx.numpy(), stable_topk_indices(x, k))
    zeros = torch.zeros(100)
    for fn in (K.topk_magnitude_triton, K.topk_magnitude_torch):
        v, idx = fn(zeros, 4)
        assert idx.tolist() == [0, 1, 2, 3] and v.tolist() == [0.0] * 4
        v, idx = fn(zeros, 4, exact=False)   # no threshold fits: exactly k, lower indices
        assert idx.tolist() == [0, 1, 2, 3]


def test_kernel_topk_deterministic():
    x = torch.randn(2500, generator=torch.Generator().manual_seed(3))
    for exact in (True, False):
        a = K.topk_magnitude_triton(x, 100, exact=exact)
        b = K.topk_magnitude_triton(x.clone(), 100, exact=exact)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _check_approx_flat(x, k, values, indices):
    assert k <= indices.numel() <= K.approx_cap(k)
    assert torch.all(indices[1:] > indices[:-1])
    assert torch.equal(values, x[indices])
    if 0 < indices.numel() < x.numel():
        mask = torch.ones(x.numel(), dtype=torch.bool)
        mask[indices] = False
        assert x[indices].abs().min() >= x[mask].abs().max()   # a valid top set


@pytest.mark.parametrize("sample_size", [16, 4096])
def test_kernel_topk_approximate_count_within_tolerance(monkeypatch, sample_size):
    # A tiny sample forces the refinement rounds; the default one samples every element.
    monkeypatch.setattr(topk_mod, "SAMPLE_SIZE", sample_size)
    gen = torch.Generator().manual_seed(sample_size)
    for n, k in ((3000, 30), (3000, 300), (2049, 2000), (500, 1)):
        x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3
        v1, i1 = K.topk_magnitude_triton(x, k, exact=False)
        v2, i2 = K.topk_magnitude_torch(x, k, exact=False)
        assert torch.equal(i1, i2) and torch.equal(v1, v2)
        _check_approx_flat(x, k, v1, i1)
        # exact mode through the same refinement path
        _, ie = K.topk_magnitude_triton(x, k)
        np.testing.assert_array_equal(ie.numpy(), stable_topk_indices(x, k))


@pytest.mark.parametrize("n,block_size,k", [(1000, 64, 5), (1000, 100, 7), (1000, 128, 128),
                                            (1000, 300, 1), (1, 16, 1), (130, 64, 0),
                                            (70, 64, 10), (50, 10**9, 3)])
def test_kernel_topk_blocks_exact(n, block_size, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k))
    expect = blocks_reference(x, block_size, k)
    for fn in (K.topk_blocks_triton, K.topk_blocks_torch):
        values, indices = fn(x, block_size, k)
        np.testing.assert_array_equal(indices.numpy(), expect)
        block_of = np.concatenate([[b] * min(k, min(block_size, n - b * block_size))
                                   for b in range(math.ceil(n / block_size))]).astype(np.int64)
        assert torch.equal(values, x[torch.from_numpy(block_of) * block_size + indices])


def test_kernel_topk_blocks_approximate(monkeypatch):
    monkeypatch.setattr(topk_mod, "SAMPLE_SIZE", 16)
    n, block_size, k = 2000, 256, 40
    x = torch.randn(n, generator=torch.Generator().manual_seed(11))
    v1, i1 = K.topk_blocks_triton(x, block_size, k, exact=False)
    v2, i2 = K.topk_blocks_torch(x, block_size, k, exact=False)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    start = 0
    for b in range(math.ceil(n / block_size)):
        block = x[b * block_size:(b + 1) * block_size]
        kb = min(k, block.numel())
        idx = i1[start:start + kb]
        start += kb
        assert torch.all(idx[1:] > idx[:-1])
        floor = block.abs().sort(descending=True).values[min(K.approx_cap(k), block.numel()) - 1]
        assert block[idx].abs().min() >= floor
    assert start == i1.numel()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernel_topk_nan_inf_raise(backend, bad):
    flat_fn, block_fn = BACKENDS[backend]
    x = torch.randn(300)
    x[123] = bad
    for exact in (True, False):
        with pytest.raises(ValueError, match="NaN or Inf"):
            flat_fn(x, 10, exact=exact)
        with pytest.raises(ValueError, match="NaN or Inf"):
            block_fn(x, 64, 3, exact=exact)
    with pytest.raises(ValueError, match="NaN or Inf"):
        flat_fn(x, 0)   # the policy does not depend on k


def test_kernel_topk_wrong_input():
    x = torch.randn(10)
    for fn in (K.topk_magnitude, K.topk_magnitude_triton):
        with pytest.raises(ValueError, match="out of range"):
            fn(x, -1)
        with pytest.raises(ValueError, match="out of range"):
            fn(x, 11)
        with pytest.raises(ValueError, match="float"):
            fn(torch.arange(10), 2)
    with pytest.raises(ValueError, match="out of range"):
        K.topk_blocks(x, 4, 5)
    with pytest.raises(ValueError, match="block_size"):
        K.topk_blocks(x, 0, 1)
