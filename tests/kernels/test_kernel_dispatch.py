"""Kernel dispatch (commrt.kernels.dispatch): COMMRT_KERNELS=auto|triton|cpu|torch, the fast
CPU path by default for CPU tensors, the interpreter requirement, and that the public
functions route accordingly."""
import subprocess
import sys

import pytest
import torch

import commrt.kernels as K
from commrt.kernels import dispatch, sparse_pack, topk


def test_kernel_dispatch_modes(monkeypatch):
    x = torch.zeros(4)
    monkeypatch.delenv("COMMRT_KERNELS", raising=False)
    assert K.mode() == "auto" and K.backend(x) == "cpu"         # CPU tensors: fast CPU
    monkeypatch.setenv("COMMRT_KERNELS", "torch")
    assert K.backend(x) == "torch"
    monkeypatch.setenv("COMMRT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.backend(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.backend(x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.topk_magnitude_triton(torch.randn(10), 2)     # the explicit variant checks too
    monkeypatch.setenv("COMMRT_KERNELS", "fast")
    with pytest.raises(ValueError, match="COMMRT_KERNELS"):
        K.backend(x)


def test_kernel_dispatch_backend(monkeypatch):
    x = torch.zeros(4)
    meta = torch.zeros(4, device="meta")
    monkeypatch.delenv("COMMRT_KERNELS", raising=False)
    assert K.backend(x) == "cpu" and K.backend(x, x) == "cpu"   # CPU tensors: fast CPU
    assert K.backend(meta) == "torch" and K.backend(x, meta) == "torch"
    monkeypatch.setenv("COMMRT_KERNELS", "torch")
    assert K.backend(x) == "torch"
    monkeypatch.setenv("COMMRT_KERNELS", " CPU ")
    assert K.mode() == "cpu" and K.backend(x) == "cpu"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        K.backend(x, meta)
    with pytest.raises(RuntimeError, match="CPU tensors"):
        K.topk_magnitude_cpu(meta, 1)
    monkeypatch.setenv("COMMRT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.backend(x) == "triton"


def test_kernel_dispatch_cpu_map_honours_threads():
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert dispatch.cpu_map(lambda i: i * i, range(7)) == [i * i for i in range(7)]
        assert dispatch.cpu_map(abs, []) == []
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode,expect", [(None, "cpu"), ("cpu", "cpu"), ("torch", "torch"),
                                         ("auto", "cpu")])
def test_kernel_dispatch_picks_fast_cpu_path(monkeypatch, mode, expect):
    # Every public top-k / error-feedback / pack / unpack / scatter-add entry point runs
    # the fast CPU code on CPU tensors in auto mode, the reference when COMMRT_KERNELS=torch.
    calls = []
    real_select = topk.select_cpu
    real_require = sparse_pack.require_cpu

    def spy_select(*args, **kwargs):
        calls.append("select")
        return real_select(*args, **kwargs)

    def spy_require(*args, **kwargs):     # the CPU branch of pack, unpack and scatter-add
        calls.append("sparse")
        return real_require(*args, **kwargs)

    monkeypatch.setattr(topk, "select_cpu", spy_select)
    monkeypatch.setattr(sparse_pack, "require_cpu", spy_require)
    if mode is None:
        monkeypatch.delenv("COMMRT_KERNELS", raising=False)
    else:
        monkeypatch.setenv("COMMRT_KERNELS", mode)
    x = torch.randn(5000)
    got = [K.topk_magnitude(x, 50), K.topk_magnitude(x, 50, exact=False),
           K.topk_blocks(x, 1000, 7), K.topk_error_feedback(x, torch.zeros(5000), 50)]
    buf = K.pack_sparse(*got[0], 5000)
    K.unpack_sparse(buf, torch.float32, 5000)
    K.scatter_add_(torch.zeros(5000), got[0][1], got[0][0])
    if expect == "cpu":
        assert calls == ["select"] * 4 + ["sparse"] * 3, calls
    else:
        assert calls == [], calls
    assert torch.equal(got[0][1], K.topk_magnitude_torch(x, 50)[1])


def test_kernel_dispatch_routes_public_functions(monkeypatch):
    calls = []
    real = topk.select_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(topk, "select_triton", spy)
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
