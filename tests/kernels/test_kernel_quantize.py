"""Block quantization (commrt.kernels.quantize): int8/int4/1-bit codes and scales against a
float64 formula, error bounds, Triton (interpreter) == torch reference == fast CPU path,
error feedback."""
import importlib
import math

import numpy as np
import pytest
import torch

import commrt.kernels as K


def formula(x: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Dequantized value per the documented formats, in float64 from float32 inputs."""
    v = x.double().reshape(-1)
    out = torch.empty_like(v)
    for s in range(0, v.numel(), block_size):
        b = v[s:s + block_size]
        absmax = b.abs().max()
        if bits == 1:
            rms = torch.sqrt((b * b).mean())
            out[s:s + block_size] = torch.where(b >= 0, rms, -rms)
        else:
            qmax = 127 if bits == 8 else 7
            if absmax == 0:
                out[s:s + block_size] = 0
                continue
            w = b / (absmax / qmax)
            q = torch.sign(w) * torch.floor(w.abs() + 0.5)
            out[s:s + block_size] = q * (absmax / qmax)
    return out


@pytest.mark.parametrize("bits", [8, 4, 1])
# (n, block_size) kept small: the interpreter runs one Triton program per block.
@pytest.mark.parametrize("n,block_size", [(0, 64), (1, 8), (100, 8), (255, 64), (1000, 256)])
def test_kernel_quantize_round_trip_and_bounds(bits, n, block_size):
    gen = torch.Generator().manual_seed(n * 3 + bits)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 10
    if n > 70:
        x[64:72] = 0.0                                     # an all-zero block when bs = 8
    q = K.quantize_triton(x, bits, block_size)
    qr = K.quantize_torch(x, bits, block_size)
    assert torch.equal(q.data, qr.data)
    torch.testing.assert_close(q.scales, qr.scales, rtol=1e-6, atol=0)
    assert q.data.dtype == torch.uint8 and q.scales.dtype == torch.float32
    assert q.data.numel() == math.ceil(n * bits / 8)
    assert q.nbytes() == K.quantized_nbytes(n, bits, block_size)
    x_hat = K.dequantize_triton(q)
    assert torch.equal(x_hat, K.dequantize_torch(q))
    assert x_hat.shape == (n,) and x_hat.dtype == x.dtype
    expect = formula(x, bits, block_size)
    torch.testing.assert_close(x_hat.double(), expect, rtol=1e-5, atol=1e-6)
    if bits != 1 and n:
        qmax = 127 if bits == 8 else 7
        nb = math.ceil(n / block_size)
        absmax = torch.nn.functional.pad(x.abs(), (0, nb * block_size - n)).view(nb, -1).amax(1)
        bound = (absmax / (2 * qmax)).repeat_interleave(block_size)[:n] * (1 + 1e-5) + 1e-7
        assert torch.all((x_hat - x).abs() <= bound)


def test_kernel_quantize_bit_layout():
    x = torch.tensor([1.0, -1.0, 0.5, -0.25, 0.0, 2.0, -2.0, 1.5])
    q8 = K.quantize_triton(x, 8, 8)
    assert q8.scales.item() == pytest.approx(2.0 / 127)
    assert q8.data[1].item() == (256 - 64)                 # -63.5 rounds away from zero: -64
    q4 = K.quantize_triton(x, 4, 8)
    codes = [int(round(v / (2.0 / 7))) + 8 for v in [1.0, -1.0]]
    assert q4.data[0].item() == codes[0] | (codes[1] << 4)
    q1 = K.quantize_triton(x, 1, 8)
    assert q1.data.tolist() == [0b10110101]
    assert q1.scales.item() == pytest.approx(math.sqrt((x.double() ** 2).mean().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_quantize_dtypes(dtype):
    x = torch.randn(300, generator=torch.Generator().manual_seed(2)).to(dtype)
    for bits in (8, 4, 1):
        q = K.quantize_triton(x, bits, 64)
        assert torch.equal(q.data, K.quantize_torch(x, bits, 64).data)
        a, b = K.dequantize_triton(q), K.dequantize_torch(q)
        assert a.dtype == dtype
        # Triton's interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest.
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=0)


def float32_codes(x: torch.Tensor, bits: int, block_size: int) -> np.ndarray:
    """The codes of the documented float32 steps, each rounded once, in numpy:
    scale = absmax / qmax, v = x * ((1 / absmax) * qmax), round half away from zero."""
    qmax = np.float32(127 if bits == 8 else 7)
    v = x.float().numpy().reshape(-1, block_size)
    absmax = np.abs(v).max(1, keepdims=True)
    inv = np.where(absmax > 0, (np.float32(1) / np.where(absmax > 0, absmax, 1)) * qmax,
                   np.float32(0)).astype(np.float32)
    w = v * inv
    return (np.sign(w) * np.floor(np.abs(w) + np.float32(0.5))).astype(np.int64).reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_quantize_codes_bit_exact_at_midpoints(dtype, bits, seed):
    """Half-precision inputs land exactly on rounding midpoints (x / scale = m + 0.5) often
    enough that computing 1/absmax * qmax as qmax / absmax (one rounding fewer) changes
    about 1 code in 10^4: every path must follow the documented steps. (A GPU build that
    divided as qmax / absmax failed this for float16; so would the interpreter.)"""
    n, block = 1 << 17, 256
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen).to(dtype)
    expected = float32_codes(x, bits, block)
    for impl in ("triton", "torch", "cpu"):
        q = getattr(K, f"quantize_{impl}")(x, bits, block)
        codes = q.data.numpy().view(np.int8).astype(np.int64) if bits == 8 else np.stack(
            [q.data.numpy() & 0xF, q.data.numpy() >> 4], 1).reshape(-1).astype(np.int64) - 8
        assert (codes != expected).sum() == 0, (impl, dtype, bits)


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_kernel_quantize_error_feedback(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(500, generator=gen)
    residual = torch.randn(500, generator=gen) * 0.1
    r1, r2 = residual.clone(), residual.clone()
    q1 = K.quantize_triton(x, bits, 128, residual=r1)
    q2 = K.quantize_torch(x, bits, 128, residual=r2)
    assert torch.equal(q1.data, q2.data)
    torch.testing.assert_close(r1, r2, rtol=0, atol=1e-6)
    x_eff = x + residual
    # The quantization error went to the residual: dequantized + residual == x + old residual.
    torch.testing.assert_close(K.dequantize(q1) + r1, x_eff, rtol=0, atol=1e-6)
    torch.testing.assert_close(K.dequantize(q1).double(), formula(x_eff, bits, 128),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, inside the interpreter
@pytest.mark.parametrize("fn", [K.quantize_triton, K.quantize_cpu, K.quantize_torch])
def test_kernel_quantize_nan_inf_and_wrong_input(fn):
    for bad in (float("nan"), float("inf")):
        x = torch.randn(100)
        x[50] = bad
        for bits in (8, 4, 1):
            with pytest.raises(ValueError, match="NaN or Inf"):
                fn(x, bits, 32)
    x = torch.randn(100)
    with pytest.raises(ValueError, match="bits"):
        fn(x, 2)
    with pytest.raises(ValueError, match="block_size"):
        fn(x, 8, 12)
    with pytest.raises(ValueError, match="float"):
        fn(torch.arange(10), 8)
    with pytest.raises(ValueError, match="shape"):
        fn(x, 8, 32, residual=torch.zeros(99))
    with pytest.raises(ValueError, match="device"):
        fn(x, 8, 32, residual=torch.zeros(100, device="meta"))
    assert K.quantized_nbytes(1000, 4, 256) == 500 + 4 * 4
    assert K.quantized_nbytes(9, 1, 8) == 2 + 8


# ----------------------------------------------------------------------------------------
# The fast CPU path against the torch reference
# ----------------------------------------------------------------------------------------
QMOD = importlib.import_module("commrt.kernels.quantize")   # K.quantize is the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _assert_same(fast, ref, bits, seed):
    assert torch.equal(fast.data, ref.data), f"codes differ (seed {seed})"
    if bits == 1:   # the RMS sum may run in another order
        torch.testing.assert_close(fast.scales, ref.scales, rtol=1e-6, atol=0,
                                   msg=lambda m: f"{m} (seed {seed})")
    else:
        assert torch.equal(fast.scales, ref.scales), f"scales differ (seed {seed})"
    assert (fast.numel, fast.bits, fast.block_size, fast.dtype) == \
        (ref.numel, ref.bits, ref.block_size, ref.dtype)


@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_quantize_cpu_matches_reference(bits, dtype, monkeypatch, seed):
    # A small chunk makes the cases below span several chunks with short last blocks.
    monkeypatch.setattr(QMOD, "CPU_CHUNK", 512)
    gen = torch.Generator().manual_seed(seed)
    for n, block_size in [(0, 64), (1, 8), (7, 8), (9, 8), (255, 64), (1000, 256), (2049, 264),
                          (5003, 128)]:
        x = (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 10).to(dtype)
        if n > 300:
            x[64:128] = 0.0                                  # an all-zero block
        ref = K.quantize_torch(x, bits, block_size)
        fast = K.quantize_cpu(x, bits, block_size)
        _assert_same(fast, ref, bits, seed)
        for q in (ref, fast):
            out, expect = K.dequantize_cpu(q), K.dequantize_torch(q)
            assert out.dtype == dtype and torch.equal(out, expect), f"seed {seed}, n {n}"


@pytest.mark.parametrize("bits,absmax,step", [(8, 15.875, 1 / 8), (4, 14.0, 2.0)])
def test_kernel_quantize_cpu_ties(bits, absmax, step):
    # absmax 15.875 gives inv = 127 / absmax = 8 and 14 gives 7 / 14 = 0.5 exactly in
    # float32, so x = (j + 1/2) * step lands on w = j + 1/2: round half away from zero.
    qmax = 127 if bits == 8 else 7
    j = torch.arange(-qmax, qmax, dtype=torch.float32)      # |j + 1/2| < qmax
    x = torch.cat([(j + 0.5) * step, torch.tensor([absmax, -absmax / 2])])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(bits))]
    fast, ref = K.quantize_cpu(x, bits, 48), K.quantize_torch(x, bits, 48)
    _assert_same(fast, ref, bits, seed=bits)
    torch.testing.assert_close(K.dequantize_cpu(fast).double(), formula(x, bits, 48),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("res_dtype", DTYPES)
def test_kernel_quantize_cpu_error_feedback(bits, res_dtype, monkeypatch, seed):
    monkeypatch.setattr(QMOD, "CPU_CHUNK", 1024)
    gen = torch.Generator().manual_seed(seed)
    for n, block_size, x_dtype in [(1, 8, torch.float32), (777, 64, torch.bfloat16),
                                   (4100, 256, torch.float32), (3001, 136, torch.float64)]:
        x = torch.randn(n, generator=gen).to(x_dtype)
        residual = (torch.randn(n, generator=gen) * 0.1).to(res_dtype)
        r_fast, r_ref = residual.clone(), residual.clone()
        fast = K.quantize_cpu(x, bits, block_size, residual=r_fast)
        ref = K.quantize_torch(x, bits, block_size, residual=r_ref)
        _assert_same(fast, ref, bits, seed)
        if bits == 1:
            torch.testing.assert_close(r_fast, r_ref, rtol=0, atol=1e-5,
                                       msg=lambda m: f"{m} (seed {seed})")
        else:
            assert torch.equal(r_fast, r_ref), f"residuals differ (seed {seed}, n {n})"
        # The invariant against float64: dequantized + new residual == x + old residual
        # (up to the rounding of 16-bit outputs: dequantize returns x's dtype).
        x_eff = x.double() + residual.double()
        wide = (torch.float32, torch.float64)
        eps = 1e-5 if x_dtype in wide and res_dtype in wide else 2e-2
        torch.testing.assert_close(K.dequantize_cpu(fast).double() + r_fast.double(), x_eff,
                                   rtol=eps, atol=eps, msg=lambda m: f"{m} (seed {seed})")


def test_kernel_quantize_cpu_layouts_threads_and_dispatch(monkeypatch, seed):
    monkeypatch.setattr(QMOD, "CPU_CHUNK", 256)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 50, generator=gen)
    x = base.t()                                             # non-contiguous, 2-D
    assert not x.is_contiguous()
    threads = torch.get_num_threads()
    try:
        for nthreads in (1, 3):                              # chunks spread over threads
            torch.set_num_threads(nthreads)
            for bits in (8, 4, 1):
                _assert_same(K.quantize_cpu(x, bits, 64), K.quantize_torch(x, bits, 64), bits,
                             seed)
    finally:
        torch.set_num_threads(threads)
    # All 256 byte values decode as the reference (1-bit and int4 unpacking).
    for bits in (1, 4):
        per = 8 // bits
        q = K.QuantizedTensor(torch.arange(256, dtype=torch.uint8), torch.rand(256 * per // 64),
                              256 * per, bits, 64, torch.float32)
        assert torch.equal(K.dequantize_cpu(q), K.dequantize_torch(q))
    # auto mode runs the CPU path on CPU tensors, cpu mode insists on it.
    monkeypatch.setenv("COMMRT_KERNELS", "auto")
    assert torch.equal(K.quantize(x, 4, 64).data, K.quantize_cpu(x, 4, 64).data)
    monkeypatch.setenv("COMMRT_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match="CPU"):
        K.quantize(torch.zeros(8, device="meta"), 8, 8)


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_kernel_quantize_cpu_nan_inf(bits):
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(3000)
        x[2500] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            K.quantize_cpu(x, bits, 64)
        residual = torch.zeros(3000)
        residual[10] = bad
        with pytest.raises(ValueError, match="residual contains NaN or Inf"):
            K.quantize_cpu(torch.randn(3000), bits, 64, residual=residual)


# ----------------------------------------------------------------------------------------
# quantize_ (x becomes its own quantization error) and dequantize(out=)
# ----------------------------------------------------------------------------------------
def _in_place_reference(x, bits, block_size):
    """The contract of quantize_: quantize, dequantize, subtract (torch reference ops)."""
    q = K.quantize_torch(x, bits, block_size)
    return q, x - K.dequantize_torch(q)


@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_quantize_in_place_cpu_and_torch(bits, dtype, monkeypatch, seed):
    monkeypatch.setattr(QMOD, "CPU_CHUNK", 512)          # several chunks, short last blocks
    gen = torch.Generator().manual_seed(seed)
    for n, block_size in [(0, 64), (1, 8), (9, 8), (255, 64), (1000, 256), (2049, 264),
                          (5003, 128)]:
        x = (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 10).to(dtype)
        if n > 300:
            x[64:128] = 0.0                              # an all-zero block
            x[200] = -0.0                                # 1 bit: -0.0 >= 0 encodes as +
        ref_q, ref_err = _in_place_reference(x, bits, block_size)
        for fn in (K.quantize_cpu_, K.quantize_torch_):
            err = x.clone()
            q = fn(err, bits, block_size)
            _assert_same(q, ref_q, bits, seed)
            if bits == 1 and fn is K.quantize_cpu_:      # scales may differ in the last bits
                expect = x - K.dequantize_torch(q)
                assert torch.equal(err, expect), f"{fn.__name__} seed {seed} n {n}"
            else:
                assert torch.equal(err, ref_err), f"{fn.__name__} seed {seed} n {n}"
        # the error against float64: x == dequantized + error (dequantize returns x's dtype)
        if dtype in (torch.float32, torch.float64) and n:
            err = x.clone()
            q = K.quantize_(err, bits, block_size)
            gap = (K.dequantize(q).double() + err.double() - x.double()).abs().max().item()
            assert gap <= 1e-6 * max(1.0, x.double().abs().max().item()), f"seed {seed}"


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_kernel_quantize_in_place_triton_and_out(bits, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, generator=gen) * 3
    ref_q, ref_err = _in_place_reference(x, bits, 64)
    err = x.clone()
    q = K.quantize_triton_(err, bits, 64)
    assert torch.equal(q.data, ref_q.data), f"seed {seed}"
    torch.testing.assert_close(q.scales, ref_q.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(err, x - K.dequantize_torch(q), rtol=0, atol=0,
                               msg=lambda m: f"{m} (seed {seed})")
    # out=: codes and scales land in the given views of one buffer, for every backend
    nbytes = K.quantized_nbytes(300, bits, 64)
    code_nbytes = (300 * bits + 7) // 8
    for fn in (K.quantize_cpu_, K.quantize_torch_, K.quantize_triton_):
        buf = torch.full((code_nbytes + 4 + nbytes,), 7, dtype=torch.uint8)
        data = buf[:code_nbytes]
        start = -(-code_nbytes // 4) * 4
        scales = buf[start:start + 4 * 5].view(torch.float32)
        err = x.clone()
        q = fn(err, bits, 64, out=(data, scales))
        assert q.data.data_ptr() == data.data_ptr() and q.scales.data_ptr() == scales.data_ptr()
        assert torch.equal(data, ref_q.data), f"{fn.__name__} seed {seed}"
        torch.testing.assert_close(scales, ref_q.scales, rtol=1e-6, atol=0)
        assert buf[start + 20:].eq(7).all(), f"{fn.__name__} wrote past out"
    with pytest.raises(ValueError, match="out must be"):
        K.quantize_(x.clone(), bits, 64, out=(torch.empty(3, dtype=torch.uint8), scales))
    with pytest.raises(ValueError, match="contiguous"):
        K.quantize_(torch.randn(8, 8).t(), bits, 8)


@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_dequantize_out(bits, dtype, monkeypatch, seed):
    monkeypatch.setattr(QMOD, "CPU_CHUNK", 512)
    gen = torch.Generator().manual_seed(seed)
    for n, block_size in [(1, 8), (9, 8), (1000, 256), (2049, 264)]:
        x = torch.randn(n, generator=gen).to(dtype)
        q = K.quantize_torch(x, bits, block_size)
        expect = K.dequantize_torch(q)
        fns = [K.dequantize_cpu, K.dequantize_torch]
        if n < 1100:
            fns.append(K.dequantize_triton)
        for fn in fns:
            out = torch.full((n,), 5.0, dtype=dtype)
            assert fn(q, out=out) is out
            if fn is K.dequantize_triton and dtype == torch.bfloat16:
                torch.testing.assert_close(out, expect, rtol=2 ** -7, atol=0)
            else:
                assert torch.equal(out, expect), f"{fn.__name__} seed {seed} n {n}"
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize(q, out=torch.empty(n + 1, dtype=dtype))
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize(q, out=torch.empty(n, dtype=torch.float16 if dtype != torch.float16
                                         else torch.float32))
