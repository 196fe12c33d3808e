"""DeMo (commrt.optim.DeMo) under mpirun, one launch per world size; each rank prints
``CHECK <name> rank <r> OK|FAIL`` and each check is its own test:

- lossless_is_sgd: top-k = the whole chunk, no sign: DeMo is data-parallel SGD at lr²
  with decoupled weight decay (float64 reference), the buffer empties, wire bytes match;
- transmitted_plus_remaining: small top-k: transmitted + remaining momentum equals the
  accumulated momentum, the applied update is the mean of what every rank transmitted,
  each chunk sends at most k coefficients, replicas stay identical, wire bytes match;
- topk_above_chunk_refused: a configuration error raises ValueError on every rank.
"""
from __future__ import annotations

import math

import pytest
import torch
from harness import assert_check, checks_fixture, run_checks

SHAPES = [(16, 24), (10,), (4, 3, 8), (7,)]
LR = 0.05


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis in float64, from the formula."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] *= 1 / math.sqrt(2.0)
    return c


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _chunk_coeffs(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(nchunks, chunk elements) float64 block DCT of x: 2-D blocks for ≥2-D tensors."""
    x = x.double()
    if x.dim() < 2:
        c = _largest_divisor(x.numel(), chunk)
        return x.reshape(-1, c) @ _dct_matrix(c).T
    rows, cols = x.shape[0], x.numel() // x.shape[0]
    cr, cc = _largest_divisor(rows, chunk), _largest_divisor(cols, chunk)
    blocks = x.reshape(rows // cr, cr, cols // cc, cc).permute(0, 2, 1, 3).reshape(-1, cr, cc)
    return torch.einsum("ai,nij,bj->nab", _dct_matrix(cr), blocks, _dct_matrix(cc)).reshape(
        -1, cr * cc)


def _grad(seed: int, rank: int, step: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100003 + rank * 1009 + step * 17 + len(shape))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _expected_payload(chunk: int, topk: int, value_bytes: int) -> int:
    total = 0
    for s in SHAPES:
        coeffs = _chunk_coeffs(torch.zeros(s), chunk)
        nchunks, elems = coeffs.shape
        k = min(topk, elems)
        total += nchunks * k * (2 + value_bytes)
        if value_bytes == 1 and k < 8:
            total += 4 * nchunks
    return total


WORLD_SIZES = [2, 6]
CHECKS = ["lossless_is_sgd", "transmitted_plus_remaining", "topk_above_chunk_refused"]


def _check_lossless_is_sgd(comm, seed: int) -> None:
    """The buffer empties every step and DeMo is plain data-parallel SGD at lr² (δ = lr·g,
    update lr·mean δ), with decoupled weight decay."""
    from commrt import transports as T
    from commrt.optim import DeMo

    P, rank = comm.size, comm.rank
    params = _params(seed)
    ref = [p.detach().double().clone() for p in params]
    wd = 0.1
    opt = DeMo(params, lr=LR, compression_decay=0.9, compression_topk=16, compression_chunk=4,
               weight_decay=wd, sign=False)
    expected_bytes = (P - 1) * _expected_payload(4, 16, 4)
    for step in range(3):
        for p in params:
            p.grad = _grad(seed, rank, step, p.shape).float()
        before = T.wire.bytes("demo.all_gather")
        opt.step()
        sent = T.wire.bytes("demo.all_gather") - before
        assert sent == opt.last_step_wire_bytes == expected_bytes, \
            (sent, opt.last_step_wire_bytes, expected_bytes)
        for i, p in enumerate(params):
            mean_g = sum(_grad(seed, r, step, p.shape) for r in range(P)) / P
            ref[i] = ref[i] * (1 - LR * wd) - LR * LR * mean_g
            torch.testing.assert_close(p.detach().double(), ref[i], rtol=1e-5, atol=1e-6)
            assert opt.state[p]["delta"].abs().max() < 1e-6, "momentum not emptied"


def _check_transmitted_plus_remaining(comm, seed: int) -> None:
    """Chunk 16 / top-2 takes the sparse inverse for the mean too (2·P·k ≤ cr + cc)."""
    from commrt import transports as T
    from commrt.optim import DeMo

    P, rank = comm.size, comm.rank
    for chunk, topk, value_bits, sign in ((4, 3, 32, False), (4, 3, 8, False), (4, 3, 8, True),
                                          (16, 2, 32, False)):
        params = _params(seed + 1)
        beta = 0.8
        opt = DeMo(params, lr=LR, compression_decay=beta, compression_topk=topk,
                   compression_chunk=chunk, sign=sign, value_bits=value_bits)
        vb = {32: 4, 16: 2, 8: 1}[value_bits]
        for step in range(4):
            prev_delta, prev_p = [], []
            for p in params:
                p.grad = _grad(seed + 7, rank, step, p.shape).float()
                st = opt.state.get(p, {})
                prev_delta.append(st["delta"].double().clone() if "delta" in st
                                  else torch.zeros(p.shape, dtype=torch.float64))
                prev_p.append(p.detach().double().clone())
            before = T.wire.bytes("demo.all_gather")
            opt.step()
            sent = T.wire.bytes("demo.all_gather") - before
            assert sent == opt.last_step_wire_bytes == (P - 1) * _expected_payload(chunk, topk, vb)
            for i, p in enumerate(params):
                accumulated = beta * prev_delta[i] + LR * p.grad.double()
                remaining = opt.state[p]["delta"].double()
                transmitted = accumulated - remaining
                coeffs = _chunk_coeffs(transmitted, chunk)
                acc_coeffs = _chunk_coeffs(accumulated, chunk)
                k = min(topk, coeffs.shape[1])
                scale = acc_coeffs.abs().max().item()
                nonzero = (coeffs.abs() > 1e-5 * scale).sum(dim=1)
                assert (nonzero <= k).all(), f"a chunk transmitted {nonzero.max()} > {k}"
                # the kept coefficients are the chunk's largest ones, at their value
                kept = acc_coeffs.abs().topk(k, dim=1).indices
                tol = 1e-5 if value_bits == 32 else acc_coeffs.abs().amax(1, keepdim=True) / 127
                err = (coeffs.gather(1, kept) - acc_coeffs.gather(1, kept)).abs()
                assert (err <= tol * 0.51 + 1e-6 * scale).all(), err.max()
                total = torch.tensor(comm.allreduce_object(transmitted.numpy())) / P
                applied = (prev_p[i] - p.detach().double()) / LR
                if sign:
                    clear = total.abs() > 1e-5 * total.abs().max()
                    torch.testing.assert_close(applied[clear], total.sign()[clear], rtol=0,
                                               atol=1e-4)
                else:
                    torch.testing.assert_close(applied, total, rtol=1e-4, atol=1e-5)  # fp32 p / lr

        # parameters stay identical across ranks
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        for other in comm.allgather_object(flat):
            assert torch.equal(other, flat), "parameters differ across ranks"


def _check_topk_above_chunk_refused(comm, seed: int) -> None:
    from commrt.optim import DeMo

    with pytest.raises(ValueError, match="compression_topk"):
        DeMo(_params(seed), lr=0.1, compression_topk=17, compression_chunk=4)


def _demo_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


launch = checks_fixture(_demo_worker, WORLD_SIZES, timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_demo_multi_rank(launch, check):
    assert_check(launch, check)


def test_optim_demo_bad_configuration():
    from commrt.optim import DeMo

    params = [torch.nn.Parameter(torch.zeros(8, 8))]
    with pytest.raises(ValueError, match="compression_topk"):
        DeMo(params, lr=0.1, compression_topk=65, compression_chunk=8)
    with pytest.raises(ValueError, match="value_bits"):
        DeMo(params, lr=0.1, value_bits=12)
    with pytest.raises(ValueError, match="lr"):
        DeMo(params, lr=0.0)
    with pytest.raises(ValueError, match="12-bit"):
        DeMo(params, lr=0.1, compression_chunk=128, value_bits=8)


@pytest.mark.parametrize("cr,cc,m", [(8, 8, 3), (8, 8, 8), (8, 8, 9), (4, 6, 20), (1, 16, 5),
                                     (64, 64, 32), (64, 64, 200)])
def test_idct_sparse_chunks_matches_dense_inverse(cr, cc, m):
    """Sparse chunks (repeated indices add up) against a float64 dense scatter + inverse
    from the formula; the cases cover the batched-product and the dense forms."""
    from commrt.optim.demo import idct_sparse_chunks

    seed = cr * 1000 + cc * 10 + m
    g = torch.Generator().manual_seed(seed)
    nchunks = 5
    values = torch.randn(nchunks, m, generator=g)
    indices = torch.randint(0, cr * cc, (nchunks, m), generator=g)
    indices[:, -1] = indices[:, 0]  # a repeated index must add up
    dense = torch.zeros(nchunks, cr * cc, dtype=torch.float64)
    dense.scatter_add_(1, indices, values.double())
    ref = torch.einsum("ai,nab,bj->nij", _dct_matrix(cr), dense.view(nchunks, cr, cc),
                       _dct_matrix(cc))
    got = idct_sparse_chunks(values, indices, cr, cc)
    assert got.shape == (nchunks, cr, cc) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5,
                               msg=lambda msg: f"seed {seed}: {msg}")
