"""Sparse pack/unpack and scatter-add (commrt.kernels.sparse_pack): byte layout, exact round
trips, Triton (interpreter) == fast CPU == torch reference, packed_nbytes, bad input."""
import struct

import pytest
import torch

import commrt.kernels as K

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 100, 65536, 65537])
@pytest.mark.parametrize("k", [0, 1, 7, 1000])
def test_kernel_pack_round_trip(dtype, block_size, k):
    if k > block_size:
        k = block_size
    gen = torch.Generator().manual_seed(k + block_size)
    values = torch.randn(k, generator=gen).to(dtype)
    indices = torch.randperm(block_size, generator=gen)[:k].sort().values
    buf_torch = K.pack_sparse_torch(values, indices, block_size)
    buf_triton = K.pack_sparse_triton(values, indices, block_size)
    assert torch.equal(buf_torch, buf_triton)
    # The CPU pack leaves no byte unwritten: equal even into recycled (dirty) memory.
    for _ in range(3):
        junk = torch.full((buf_torch.numel() + 64,), 0xAB, dtype=torch.uint8)
        del junk
        assert torch.equal(K.pack_sparse_cpu(values, indices.to(torch.int32), block_size),
                           buf_torch)
    assert buf_torch.dtype == torch.uint8
    assert buf_torch.numel() == K.packed_nbytes(k, dtype, block_size)
    # Layout as documented: header, values, 4-byte aligned indices.
    itemsize = values.element_size()
    width = 2 if block_size <= 65536 else 4
    raw = bytes(buf_torch.tolist())
    magic, version, code, w, count = struct.unpack("<BBBBI", raw[:8])
    assert (magic, version, w, count) == (0xC5, 1, width, k)
    assert code == DTYPES.index(dtype)
    idx_off = 8 + (k * itemsize + 3) // 4 * 4
    fmt = f"<{k}{'H' if width == 2 else 'i'}"
    assert list(struct.unpack(fmt, raw[idx_off:idx_off + k * width])) == indices.tolist()
    assert raw[8:8 + k * itemsize] == values.view(torch.uint8).numpy().tobytes()
    # Round trip, also from a longer receive buffer.
    padded = torch.cat([buf_torch, torch.full((13,), 255, dtype=torch.uint8)])
    unaligned = torch.cat([torch.zeros(3, dtype=torch.uint8), buf_torch])[3:]
    for unpack in (K.unpack_sparse_torch, K.unpack_sparse_triton, K.unpack_sparse_cpu):
        for received in (padded, unaligned):
            v, i = unpack(received, dtype, block_size)
            assert i.dtype == torch.int64
            assert torch.equal(v, values) and torch.equal(i, indices)


def test_kernel_pack_topk_pipeline():
    # Selected entries survive topk -> pack -> unpack -> scatter exactly.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    values, indices = K.topk_magnitude(x, 50)
    v, i = K.unpack_sparse(K.pack_sparse(values, indices, 1000), torch.float32, 1000)
    dense = torch.zeros(1000)
    K.scatter_add_(dense, i, v)
    assert torch.equal(dense[indices], x[indices])
    assert int((dense != 0).sum()) == 50


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.float64, torch.float16])
def test_kernel_scatter_add_matches_float64(dense_dtype):
    gen = torch.Generator().manual_seed(9)
    for n, k in ((1, 5), (300, 700), (4000, 300), (50, 0)):
        base = torch.randn(n, generator=gen).to(dense_dtype)
        idx = torch.randint(0, n, (k,), generator=gen)          # duplicates included
        vals = torch.randn(k, generator=gen).to(dense_dtype)
        expect = base.double().index_add(0, idx, vals.double())
        tol = 1e-2 if dense_dtype == torch.float16 else 1e-5
        for fn in (K.scatter_add_torch_, K.scatter_add_triton_, K.scatter_add_cpu_):
            d = base.clone()
            assert fn(d, idx, vals) is d
            torch.testing.assert_close(d.double(), expect, atol=tol, rtol=tol)


def test_kernel_scatter_add_packed_blocks():
    gen = torch.Generator().manual_seed(12)
    block_size, blocks, k = 256, [0, 3, 1, 3], 20
    dense = torch.zeros(4 * block_size)
    expect = torch.zeros(4 * block_size, dtype=torch.float64)
    bufs = []
    for b in blocks:
        vals = torch.randn(k, generator=gen)
        idx = torch.randperm(block_size, generator=gen)[:k]
        bufs.append(K.pack_sparse(vals, idx, block_size))
        expect.index_add_(0, idx + b * block_size, vals.double())
    K.scatter_add_packed_(dense, bufs, [b * block_size for b in blocks], block_size)
    torch.testing.assert_close(dense.double(), expect, atol=1e-6, rtol=1e-6)


def test_kernel_pack_cpu_non_contiguous_and_2d():
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    values = torch.randn(40, 6, generator=gen)[:, ::2]            # non-contiguous
    indices = torch.randperm(5000, generator=gen)[:120].view(40, 3)
    expect = K.pack_sparse_torch(values, indices, 5000)
    assert torch.equal(K.pack_sparse_cpu(values, indices, 5000), expect)
    v, i = K.unpack_sparse_cpu(expect, torch.float32, 5000)
    assert torch.equal(v, values.reshape(-1)) and torch.equal(i, indices.reshape(-1))


def test_kernel_pack_wrong_input():
    v, i = torch.randn(3), torch.tensor([0, 5, 9])
    for pack in (K.pack_sparse, K.pack_sparse_cpu, K.pack_sparse_torch):
        with pytest.raises(ValueError, match="indices must lie"):
            pack(v, i, 9)
    with pytest.raises(ValueError, match="indices must lie"):
        K.pack_sparse(v, torch.tensor([-1, 0, 1]), 9)
    with pytest.raises(ValueError, match="3 values but 2 indices"):
        K.pack_sparse(v, i[:2], 10)
    with pytest.raises(ValueError, match="float"):
        K.pack_sparse(i, i, 10)
    with pytest.raises(ValueError, match="integer"):
        K.pack_sparse(v, v, 10)
    with pytest.raises(ValueError, match="block_size"):
        K.pack_sparse(v, i, 0)
    buf = K.pack_sparse(v, i, 10)
    with pytest.raises(ValueError, match="float32 values, asked for"):
        K.unpack_sparse(buf, torch.float16, 10)
    with pytest.raises(ValueError, match="2-byte indices"):
        K.unpack_sparse(buf, torch.float32, 100000)
    with pytest.raises(ValueError, match="truncated"):
        K.unpack_sparse(buf[:-1], torch.float32, 10)
    with pytest.raises(ValueError, match="magic"):
        K.unpack_sparse(torch.zeros(32, dtype=torch.uint8), torch.float32, 10)
    with pytest.raises(ValueError, match="indices must lie"):
        K.scatter_add_(torch.zeros(5), torch.tensor([5]), torch.ones(1))
    with pytest.raises(ValueError, match="1 indices but 2 values"):
        K.scatter_add_(torch.zeros(5), torch.tensor([1]), torch.ones(2))
    assert K.packed_nbytes(3, torch.float16, 10) == 8 + 8 + 6
    assert K.packed_nbytes(3, torch.float32, 70000) == 8 + 12 + 12
