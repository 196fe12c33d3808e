"""Chunked orthonormal DCT-II (commrt.kernels.dct): chunk sizes, basis against the naive
float64 sum, 1-D and 2-D round trips, energy preservation, shapes, bad input, and the fast
CPU form against the torch reference."""
import math

import numpy as np
import pytest
import torch

import commrt.kernels as K


def naive_dct(v: np.ndarray) -> np.ndarray:
    n = v.shape[0]
    out = np.zeros(n)
    for f in range(n):
        s = sum(v[i] * math.cos(math.pi * (2 * i + 1) * f / (2 * n)) for i in range(n))
        out[f] = s * math.sqrt((1.0 if f == 0 else 2.0) / n)
    return out


def test_kernel_dct_chunk_size():
    cases = {(64, 64): 64, (100, 64): 50, (97, 64): 1, (0, 64): 1, (12, 5): 4, (4096, 64): 64,
             (768, 64): 64, (30, 7): 6, (1, 64): 1}
    for (dim, chunk), expect in cases.items():
        assert K.dct_chunk_size(dim, chunk) == expect, (dim, chunk)
    for dim in range(1, 200):
        c = K.dct_chunk_size(dim, 16)
        assert dim % c == 0 and c == max(d for d in range(1, 17) if dim % d == 0)
    with pytest.raises(ValueError):
        K.dct_chunk_size(10, 0)


def test_kernel_dct_basis_matches_naive_sum():
    for size in (1, 5, 8):
        basis = K.dct_basis(size, torch.float64)
        torch.testing.assert_close(basis @ basis.T, torch.eye(size, dtype=torch.float64))
        v = np.random.default_rng(size).standard_normal(size)
        np.testing.assert_allclose((basis @ torch.from_numpy(v)).numpy(), naive_dct(v),
                                   atol=1e-12)
    assert K.dct_basis(8, torch.float32) is K.dct_basis(8, torch.float32)   # cached


@pytest.mark.parametrize("n,chunk", [(0, 64), (1, 64), (100, 64), (97, 64), (4096, 64)])
def test_kernel_dct_1d_round_trip(n, chunk):
    gen = torch.Generator().manual_seed(n)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = torch.randn(n, generator=gen, dtype=dtype)
        c = K.dct_chunks(x, chunk)
        size = K.dct_chunk_size(n, chunk)
        assert c.shape == (n // size, size) and c.dtype == dtype
        if n:
            v = x.double().numpy()[:size]
            np.testing.assert_allclose(c[0].double().numpy(), naive_dct(v), atol=tol * 10)
            torch.testing.assert_close(c.norm(), x.norm(), rtol=tol, atol=tol)
        back = K.idct_chunks(c, chunk)
        assert back.shape == (n,)
        torch.testing.assert_close(back, x, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,chunk", [((12, 20), 8), ((64, 128), 64), ((7, 9), (4, 3)),
                                         ((0, 5), 4), ((1, 1), 64)])
def test_kernel_dct_2d_round_trip(shape, chunk):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)),
                    dtype=torch.float64)
    c = K.dct_chunks(x, chunk)
    cr_req, cc_req = (chunk, chunk) if isinstance(chunk, int) else chunk
    cr, cc = K.dct_chunk_size(shape[0], cr_req), K.dct_chunk_size(shape[1], cc_req)
    assert c.shape == (shape[0] // cr, shape[1] // cc, cr, cc)
    if x.numel():
        # Separable: chunk (0, 0) equals the naive DCT along rows then columns.
        block = x[:cr, :cc].numpy()
        rows = np.stack([naive_dct(r) for r in block])
        expect = np.stack([naive_dct(col) for col in rows.T]).T
        np.testing.assert_allclose(c[0, 0].numpy(), expect, atol=1e-10)
    back = K.idct_chunks(c)
    assert back.shape == shape
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)


def test_kernel_dct_half_precision_and_errors():
    x = torch.randn(256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    back = K.idct_chunks(K.dct_chunks(x, 64))
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back.float(), x.float(), rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        K.dct_chunks(torch.zeros(2, 2, 2), 4)
    with pytest.raises(ValueError, match="float"):
        K.dct_chunks(torch.arange(8), 4)
    with pytest.raises(ValueError, match="exceed"):
        K.idct_chunks(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="chunk"):
        K.dct_chunks(torch.zeros(8), 0)


TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape,chunk", [((4096,), 64), ((97,), 64), ((0,), 64), ((3,), 2),
                                         ((12, 20), 8), ((7, 9), (4, 3)), ((128, 192), 64),
                                         ((50, 320), 64), ((1, 1), 64), ((0, 5), 4),
                                         ((64, 1), 16)])
def test_kernel_dct_cpu_matches_reference(dtype, shape, chunk):
    seed = int(torch.randint(0, 2 ** 31, ()).item())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    tol = TOL[dtype]
    fast, ref = K.dct_chunks_cpu(x, chunk), K.dct_chunks_torch(x, chunk)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol, msg=lambda m: f"{m} (seed {seed})")
    back, back_ref = K.idct_chunks_cpu(ref, chunk), K.idct_chunks_torch(ref, chunk)
    assert back.shape == back_ref.shape == x.shape and back.dtype == dtype
    torch.testing.assert_close(back, back_ref, rtol=tol, atol=tol,
                               msg=lambda m: f"{m} (seed {seed})")
    if dtype == torch.float64 and x.numel():
        torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)


def test_kernel_dct_cpu_layouts_and_dispatch(monkeypatch):
    seed = int(torch.randint(0, 2 ** 31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(96, 40, generator=gen, dtype=torch.float64).t()   # non-contiguous (40, 96)
    ref = K.dct_chunks_torch(m, (8, 32))
    torch.testing.assert_close(K.dct_chunks_cpu(m, (8, 32)), ref, rtol=1e-12, atol=1e-12)
    coeffs = torch.randn(6, 5, 4, 3, generator=gen, dtype=torch.float64).transpose(0, 1)
    torch.testing.assert_close(K.idct_chunks_cpu(coeffs), K.idct_chunks_torch(coeffs),
                               rtol=1e-12, atol=1e-12, msg=lambda m: f"{m} (seed {seed})")
    v = torch.randn(1280, generator=gen)[::2]                          # a strided 1-D source
    torch.testing.assert_close(K.dct_chunks_cpu(v, 16), K.dct_chunks_torch(v, 16))
    # auto dispatch on CPU tensors is the fast form; torch mode is the reference.
    x = torch.randn(64, 64, generator=gen)
    monkeypatch.setenv("COMMRT_KERNELS", "auto")
    assert torch.equal(K.dct_chunks(x, 16), K.dct_chunks_cpu(x, 16))
    monkeypatch.setenv("COMMRT_KERNELS", "torch")
    assert torch.equal(K.dct_chunks(x, 16), K.dct_chunks_torch(x, 16))
    assert torch.equal(K.idct_chunks(K.dct_chunks_torch(x, 16)),
                       K.idct_chunks_torch(K.dct_chunks_torch(x, 16)))
