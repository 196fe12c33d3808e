"""Top-k by magnitude (commrt.kernels.topk): Triton (interpreter), fast CPU and torch
reference vs an independent numpy stable-sort reference; approximate-mode tolerance; ties;
NaN/Inf; errors. The fast CPU path is also compared with the reference on fresh random
inputs large enough for its sampled threshold, and with its fallbacks forced."""
import math

import numpy as np
import pytest
import torch
from references import stable_topk_indices

import commrt.kernels as K
from commrt.kernels import topk_cpu, topk_search

BACKENDS = {
    "triton": (K.topk_magnitude_triton, K.topk_blocks_triton),
    "torch": (K.topk_magnitude_torch, K.topk_blocks_torch),
    "cpu": (K.topk_magnitude_cpu, K.topk_blocks_cpu),
}


def blocks_reference(x: torch.Tensor, block_size: int, k: int) -> np.ndarray:
    out = []
    for start in range(0, x.numel(), block_size):
        out.append(stable_topk_indices(x[start:start + block_size], min(k, block_size)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (7, 0), (7, 3), (7, 7), (1000, 1),
                                 (1000, 10), (3001, 150), (3001, 3001)])
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
        for fn in (K.topk_magnitude_triton, K.topk_magnitude_torch, K.topk_magnitude_cpu):
            _, idx = fn(x, k)
            np.testing.assert_array_equal(idx.numpy(), stable_topk_indices(x, k))
    zeros = torch.zeros(100)
    for fn in (K.topk_magnitude_triton, K.topk_magnitude_torch, K.topk_magnitude_cpu):
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
    monkeypatch.setattr(topk_search, "SAMPLE_SIZE", sample_size)
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
    for fn in (K.topk_blocks_triton, K.topk_blocks_torch, K.topk_blocks_cpu):
        values, indices = fn(x, block_size, k)
        np.testing.assert_array_equal(indices.numpy(), expect)
        block_of = np.concatenate([[b] * min(k, min(block_size, n - b * block_size))
                                   for b in range(math.ceil(n / block_size))]).astype(np.int64)
        assert torch.equal(values, x[torch.from_numpy(block_of) * block_size + indices])


def test_kernel_topk_blocks_approximate(monkeypatch):
    monkeypatch.setattr(topk_search, "SAMPLE_SIZE", 16)
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


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
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
    for fn in (K.topk_magnitude, K.topk_magnitude_triton, K.topk_magnitude_cpu):
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


# ----------------------------------------------------------------------------------------
# The fast CPU implementation against the torch reference
# ----------------------------------------------------------------------------------------
def _check_cpu_flat(x: torch.Tensor, k: int, seed: int) -> None:
    ve, ie = K.topk_magnitude_cpu(x, k)
    vr, ir = K.topk_magnitude_torch(x, k)
    assert torch.equal(ie, ir), f"seed {seed}: exact indices differ (n={x.numel()}, k={k})"
    assert torch.equal(ve, vr) and ve.dtype == x.dtype, f"seed {seed}"
    va, ia = K.topk_magnitude_cpu(x, k, exact=False)
    try:
        _check_approx_flat(x.reshape(-1), k, va, ia)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: approximate selection (n={x.numel()}, k={k})") from e


@pytest.mark.parametrize("n", [1000, 1023, 1024, 65_537, 300_001])
def test_kernel_topk_cpu_matches_reference_fresh(n, seed):
    # Fresh inputs each run (the seed is printed on failure); sizes from the direct path
    # (n < 1024) through the sampled threshold with several chunks.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 2
    for k in (1, 2, n // 1000 + 3, n // 100, n // 10, n // 2, n):
        _check_cpu_flat(x, k, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_topk_cpu_low_and_high_precision(dtype, seed):
    # float16/bfloat16 have few distinct magnitudes: ties at the k-th are the rule here.
    x = torch.randn(60_003, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for k in (0, 1, 100, 2000, 30_000):
        _check_cpu_flat(x, k, seed)
    for block_size, k in ((64, 5), (5000, 50), (70_000, 700)):
        v1, i1 = K.topk_blocks_cpu(x, block_size, k)
        v2, i2 = K.topk_blocks_torch(x, block_size, k)
        assert torch.equal(i1, i2) and torch.equal(v1, v2), f"seed {seed}, block {block_size}"


def test_kernel_topk_cpu_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (60_000,), generator=gen).float()
    for k in (1, 17, 1000, 30_000, 59_999):
        _check_cpu_flat(x, k, seed)
        np.testing.assert_array_equal(K.topk_magnitude_cpu(x, k)[1].numpy(),
                                      stable_topk_indices(x, k), err_msg=f"seed {seed}")
    zeros = torch.zeros(50_000)
    _, idx = K.topk_magnitude_cpu(zeros, 7, exact=False)    # no threshold fits: k, lowest
    assert idx.tolist() == list(range(7))
    for block_size, k in ((10, 3), (4096, 100), (30_000, 5)):
        v1, i1 = K.topk_blocks_cpu(x, block_size, k)
        np.testing.assert_array_equal(i1.numpy(), blocks_reference(x, block_size, k),
                                      err_msg=f"seed {seed}, block {block_size}")


def test_kernel_topk_cpu_non_contiguous_and_shaped(seed):
    base = torch.randn(600, 700, generator=torch.Generator().manual_seed(seed))
    for x in (base.t(), base[:, ::3], base[::2]):
        assert not x.is_contiguous() or x.dim() == 2
        _check_cpu_flat(x, 4000, seed)
        v1, i1 = K.topk_blocks_cpu(x, 2048, 30)
        v2, i2 = K.topk_blocks_torch(x, 2048, 30)
        assert torch.equal(i1, i2) and torch.equal(v1, v2), f"seed {seed}"


@pytest.mark.parametrize("n,block_size,k", [(1_000_003, 4096, 40), (1_000_003, 100_000, 1000),
                                            (300_000, 1000, 1), (300_000, 1024, 1024),
                                            (300_001, 70_000, 0), (200_000, 64, 8),
                                            (5000, 10**9, 33), (65_536 * 3 + 5, 65_536, 655)])
@pytest.mark.parametrize("exact", [True, False])
def test_kernel_topk_blocks_cpu_fresh(n, block_size, k, exact, seed):
    # Approximate blocks: the fast CPU path returns the exact selection (within the contract).
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    v1, i1 = K.topk_blocks_cpu(x, block_size, k, exact=exact)
    v2, i2 = K.topk_blocks_torch(x, block_size, k)
    assert torch.equal(i1, i2) and torch.equal(v1, v2), f"seed {seed}"


def test_kernel_topk_cpu_fallbacks_and_threads(monkeypatch, seed):
    # A sample threshold that misses (negative margin: too few candidates) sends rows to
    # the direct path; tiny chunks split rows over many segments; rows' k-th found one by
    # one or padded together; two threads run the segments in parallel. The result never
    # changes.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=gen)
    x[::7] = 0.5                                     # ties, too
    expect = {k: K.topk_magnitude_torch(x, k) for k in (10, 2000)}
    expect_blocks = K.topk_blocks_torch(x, 20_000, 150)
    threads = torch.get_num_threads()
    for z, chunk, row_loop, nthreads in ((-30.0, 1 << 18, 1024, 1), (4.0, 3000, 0, 1),
                                         (-30.0, 5000, 0, 2), (4.0, 1 << 18, 1024, 2)):
        monkeypatch.setattr(topk_cpu, "CPU_SAMPLE_Z", z)
        monkeypatch.setattr(topk_cpu, "CPU_CHUNK", chunk)
        monkeypatch.setattr(topk_cpu, "CPU_ROW_LOOP", row_loop)
        torch.set_num_threads(nthreads)
        try:
            for k, (v, i) in expect.items():
                got = K.topk_magnitude_cpu(x, k)
                assert torch.equal(got[1], i) and torch.equal(got[0], v), (seed, z, chunk, k)
                _check_approx_flat(x, k, *K.topk_magnitude_cpu(x, k, exact=False))
            got = K.topk_blocks_cpu(x, 20_000, 150)
            assert torch.equal(got[1], expect_blocks[1]), (seed, z, chunk)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("where", [0, 4321, 199_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernel_topk_cpu_nan_inf_anywhere(where, bad):
    # Large enough for the sampled path: the bad entry is (mostly) not in the sample.
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(where))
    x[where] = bad
    for k in (0, 1, 2000):
        for exact in (True, False):
            with pytest.raises(ValueError, match="NaN or Inf"):
                K.topk_magnitude_cpu(x, k, exact=exact)
    for block_size in (64, 4096, 150_000):
        with pytest.raises(ValueError, match="NaN or Inf"):
            K.topk_blocks_cpu(x, block_size, 3)


# -- above_threshold: the candidate pass on its own ----------------------------------------

ABOVE = {"cpu": K.above_threshold_cpu, "torch": K.above_threshold_torch,
         "dispatch": K.above_threshold}


def above_reference(rows: torch.Tensor, thresholds: torch.Tensor) -> np.ndarray:
    """Row-major flat positions of |v| >= thresholds[row], compared in float64 (exact for
    every float dtype)."""
    a = np.abs(rows.double().numpy())
    return np.flatnonzero(a >= thresholds.double().numpy()[:, None])


@pytest.mark.parametrize("impl", sorted(ABOVE))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernel_above_threshold_matches_float64_reference(impl, dtype, monkeypatch, seed):
    g = torch.Generator().manual_seed(seed)
    # A small chunk so that long rows split and short rows group within one call.
    monkeypatch.setattr(topk_cpu, "CPU_CHUNK", 4096)
    for s, c in ((1, 1), (1, 10_000), (3, 5000), (700, 17), (2, 0), (0, 5)):
        rows = torch.randn(s, c, generator=g, dtype=torch.float64).to(dtype)
        rows.view(-1)[::7] = 0.0
        rows.view(-1)[1::11] = -0.0
        if s and c > 1:
            thresholds = rows.abs().double().quantile(0.9, dim=1).to(dtype)
            thresholds[0] = -1.0          # a negative threshold selects the whole row
            rows[s // 2, 1] = -thresholds[s // 2]   # a magnitude exactly at it counts
        else:
            thresholds = torch.zeros(s, dtype=dtype)
        values, indices = ABOVE[impl](rows, thresholds)
        expected = above_reference(rows, thresholds)
        assert indices.dtype == torch.int64 and values.dtype == dtype, f"seed {seed}"
        np.testing.assert_array_equal(indices.numpy(), expected,
                                      err_msg=f"seed {seed} s={s} c={c}")
        assert torch.equal(values, rows.reshape(-1)[indices]), f"seed {seed} s={s} c={c}"


@pytest.mark.parametrize("impl", sorted(ABOVE))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernel_above_threshold_nan_inf_and_errors(impl, bad):
    fn = ABOVE[impl]
    rows = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    thresholds = torch.full((3,), 2.0)
    broken = rows.clone()
    broken[2, 999] = bad
    with pytest.raises(ValueError, match="rows contains NaN or Inf"):
        fn(broken, thresholds)
    with pytest.raises(ValueError, match="thresholds contains NaN or Inf"):
        fn(rows, torch.tensor([1.0, bad, 1.0]))
    with pytest.raises(ValueError, match="thresholds must be 1-D of length 3"):
        fn(rows, thresholds[:2])
    with pytest.raises(ValueError, match="dtype torch.float32"):
        fn(rows, thresholds.double())
    with pytest.raises(ValueError, match="rows must be 2-D"):
        fn(rows.reshape(-1), thresholds)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        fn(rows.to(torch.int32), thresholds)
