"""Kernel dispatch (commrt.kernels.dispatch): COMMRT_KERNELS=auto|torch|triton, CPU default,
the interpreter requirement, and that the public functions route accordingly."""
import subprocess
import sys

import pytest
import torch

import commrt.kernels as K
from commrt.kernels import dispatch, topk


def test_kernel_dispatch_modes(monkeypatch):
    x = torch.zeros(4)
    monkeypatch.delenv("COMMRT_KERNELS", raising=False)
    assert K.mode() == "auto" and not K.use_triton(x)           # CPU tensors: reference
    monkeypatch.setenv("COMMRT_KERNELS", "torch")
    assert not K.use_triton(x)
    monkeypatch.setenv("COMMRT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.use_triton(x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.topk_magnitude_triton(torch.randn(10), 2)     # the explicit variant checks too
    monkeypatch.setenv("COMMRT_KERNELS", "fast")
    with pytest.raises(ValueError, match="COMMRT_KERNELS"):
        K.use_triton(x)


def test_kernel_dispatch_routes_public_functions(monkeypatch):
    calls = []
    real = topk._select_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(topk, "_select_triton", spy)
    x = torch.randn(200)
    monkeypatch.setenv("COMMRT_KERNELS", "torch")
    expect = K.topk_magnitude(x, 9)
    assert not calls
    monkeypatch.setenv("COMMRT_KERNELS", "triton")
    got = K.topk_magnitude(x, 9)
    assert calls and torch.equal(got[1], expect[1])


def test_kernel_import_without_triton():
    # The torch references must work where triton is not installed.
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, commrt.kernels as K\n"
            "assert not K.triton_available()\n"
            "x = torch.randn(100)\n"
            "v, i = K.topk_magnitude(x, 5)\n"
            "q = K.dequantize(K.quantize(x, 4))\n"
            "print('ok', i.numel())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 5" in out.stdout
