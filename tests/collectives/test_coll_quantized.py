"""quantized_allreduce (8, 4, 1 bit, two-phase error feedback) under mpirun.

One launch per world size; each rank prints ``CHECK <name> rank <r> OK|FAIL``:

- conservation: Σ residual_after + P·result == Σ (tensor + residual), float64, every
                bit width and several sizes (also not multiples of the block; block
                sizes whose 1-bit pieces leave the scales unaligned), all ranks
                holding the same result; 8-bit close to the exact mean;
- convergence:  repeated identical gradient: the applied total approaches the dense total;
- wire_bytes:   2(P-1)·(c·bits/8 + 4c/block) per rank, split between all-to-all and
                all-gather (one message each).
"""
import torch
from harness import assert_check, checks_fixture, gather_rows, generator, run_checks

WORLD_SIZES = [2, 3, 5]
CHECKS = ["conservation", "convergence", "wire_bytes"]


def _check_conservation(comm, seed):
    from commrt.collectives import QuantizedAllreduce, quantized_allreduce

    P = comm.size
    # block_size 24: the 1-bit pieces' scales sit at offsets not aligned for float32
    for bits, block_size in ((8, 64), (4, 64), (1, 64), (1, 24), (4, 24)):
        reducer = QuantizedAllreduce(bits, block_size=block_size)
        for step, n in enumerate((1, 63, 300, 1000)):
            g = generator(seed, "conservation", block_size, bits, step, comm.rank)
            tensor = torch.randn(n, generator=g, dtype=torch.float64)
            residual = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
            total_in = gather_rows(comm, tensor + residual).sum(0)
            reducer(tensor, residual)
            results = gather_rows(comm, tensor)
            assert torch.equal(results.min(0).values, results.max(0).values), \
                f"{bits} bit: ranks hold different results"
            gap = (gather_rows(comm, residual).sum(0) + P * tensor - total_in).abs().max().item()
            assert gap < 1e-11, f"{bits} bit n={n}: conservation off by {gap}"
            if bits == 8 and n >= 300:
                mean = total_in / P
                rel = ((tensor - mean).norm() / mean.norm()).item()
                assert rel < 0.03, f"8 bit: relative error {rel:.4f} against the exact mean"
    # float32 with n = P·c: X is formed inside the first quantization pass; a strided
    # tensor (same values) takes the separate add, bit for bit the same
    for bits in (8, 4, 1):
        n = P * 512
        g = generator(seed, "float32", bits, comm.rank)
        tensor = torch.randn(n, generator=g)
        residual = 0.1 * torch.randn(n, generator=g)
        total_in = gather_rows(comm, tensor.double() + residual.double()).sum(0)
        strided = torch.empty(n, 2)[:, 0]
        strided.copy_(tensor)
        r_strided = residual.clone()
        QuantizedAllreduce(bits)(tensor, residual)
        QuantizedAllreduce(bits)(strided, r_strided)
        assert torch.equal(tensor, strided) and torch.equal(residual, r_strided), \
            f"{bits} bit float32: the fused add changed the result"
        gap = (gather_rows(comm, residual).sum(0) + P * tensor.double() - total_in).abs().max()
        assert gap.item() < 1e-4, f"{bits} bit float32: conservation off by {gap.item()}"
    # float32 and shaped tensors through the functional API
    tensor = torch.randn(4, 33, generator=generator(seed, "shaped", comm.rank))
    residual = torch.zeros(4, 33)
    expected = gather_rows(comm, tensor).mean(0).view(4, 33)
    quantized_allreduce(tensor, residual, 8)
    assert ((tensor.double() - expected).norm() / expected.norm()).item() < 0.03


def _check_convergence(comm, seed):
    from commrt.collectives import QuantizedAllreduce

    n = 200
    g = generator(seed, "convergence", comm.rank)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    dense_mean = gather_rows(comm, grad).mean(0)
    for bits in (8, 4, 1):
        reducer = QuantizedAllreduce(bits, block_size=64)
        residual = torch.zeros(n, dtype=torch.float64)
        applied = torch.zeros(n, dtype=torch.float64)
        errors = {}
        for step in range(1, 41):
            tensor = grad.clone()
            reducer(tensor, residual)
            applied += tensor
            if step in (10, 40):
                errors[step] = ((applied - step * dense_mean).norm()
                                / (step * dense_mean).norm()).item()
        assert errors[40] < 0.15, f"{bits} bit: relative error {errors}"
        assert errors[40] < 0.5 * errors[10], f"{bits} bit: not shrinking {errors}"


def _check_wire_bytes(comm, seed):
    from commrt import transports as T
    from commrt.collectives import QuantizedAllreduce

    P = comm.size
    for bits in (8, 4, 1):
        for n in (100, 5000):
            reducer = QuantizedAllreduce(bits)
            tensor = torch.randn(n)
            residual = torch.zeros(n)
            before = T.wire.snapshot()
            reducer(tensor, residual)
            delta = T.snapshot_delta(T.wire.snapshot(), before)
            c = -(-((n + P - 1) // P) // 256) * 256  # per-rank chunk, whole blocks
            piece = c * bits // 8 + 4 * (c // 256)
            expect = {"quant.all_to_all": ((P - 1) * piece, 1),
                      "quant.all_gather": ((P - 1) * piece, 1)}
            assert delta == expect, f"{bits} bit n={n}: {delta} != {expect}"
            # against dense: 2(P-1)/P·n·4 bytes
            if n == 5000 and bits == 8:
                assert sum(b for b, _ in delta.values()) < 0.3 * 2 * (P - 1) * n * 4 / P + \
                    2 * (P - 1) * (256 + 4)


def _quant_worker(seed: int) -> None:
    from commrt import transports as T

    comm = T.world()
    run_checks({name: globals()[f"_check_{name}"] for name in CHECKS}, comm, seed,
               rank=comm.rank)


launch = checks_fixture(_quant_worker, WORLD_SIZES, timeout=300)


def test_quant_conservation(launch):
    assert_check(launch, "conservation")


def test_quant_error_feedback_convergence(launch):
    assert_check(launch, "convergence")


def test_quant_wire_bytes(launch):
    assert_check(launch, "wire_bytes")
