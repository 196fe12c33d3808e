"""Block quantization (commrt.kernels.quantize): int8/int4/1-bit codes and scales against a
float64 formula, error bounds, Triton (interpreter) == torch reference, error feedback."""
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
@pytest.mark.parametrize("fn", [K.quantize_triton, K.quantize_torch])
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
