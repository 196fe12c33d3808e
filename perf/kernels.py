"""Benchmark of the compression kernels: Triton vs torch.topk and vs each torch reference.

    python -m perf.kernels [--sizes 1m,16m,100m] [--densities 0.001,0.01,0.1]
                           [--impls triton,torch] [--dtype float32] [--repeat 5]
                           [--device auto|cuda|cpu] [--threads 1] [--quick]
                           [--json OUT] [--markdown OUT]

For each size n (elements; k/m suffixes) it measures the device's copy bandwidth (a torch
clone of n elements: 2·n·itemsize bytes over its time), then times every kernel and
reports time, the kernel's compulsory memory traffic in GB/s, that as a fraction of the
copy bandwidth, and for top-k the speedup over ``torch.topk`` with the same k:

* ``topk_exact`` / ``topk_approx`` (flat, per density; traffic: one read of x),
  ``torch.topk`` (the baseline);
* ``topk_error_feedback`` (approximate, per density; read grad and residual, write
  residual);
* ``quantize`` int8 / int4 / 1-bit, int8 with error feedback, ``dequantize`` int8;
* ``pack_sparse`` + ``unpack_sparse`` and ``scatter_add_`` of the k selected pairs;
* ``dct_chunks`` (1-D, chunk 64; read and write n).

Defaults: on CUDA sizes 1M..256M (capped by free device memory) and both implementations;
on CPU small sizes and the torch references only (the Triton interpreter is far too slow
to time), so the script runs everywhere and cannot rot. ``--quick``: the smallest sweep
(used by ``python -m perf run quick``). Records go to ``--json`` as a list of dicts (the
perf suite's format) and, with ``--markdown``, to a table with the device's name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import commrt.kernels as K

GPU_SIZES = "1m,4m,16m,64m,100m,256m"
CPU_SIZES = "64k,1m,4m"
QUICK_SIZES = "64k,1m"
DENSITIES = "0.001,0.01,0.1"


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kmg" else text
    return int(float(number) * mult)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


class Timing(float):
    """Median wall seconds (the float value) with the minimum and the CPU time beside it."""
    min_s: float
    cpu_s: float


def timer(fn: Callable[[], object], device: torch.device, repeat: int,
          setup: Optional[Callable[[], object]] = None) -> Timing:
    """Wall seconds of ``fn`` over ``repeat`` runs after one warm-up (setup untimed).

    On a shared CPU the wall time includes waiting for a core; the process CPU time
    (median, all threads) is recorded too, as a load-independent cost.
    """
    walls, cpus = [], []
    for i in range(repeat + 1):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu0, start = time.process_time(), time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu0)
    out = Timing(statistics.median(walls))
    out.min_s = min(walls)
    out.cpu_s = statistics.median(cpus)
    return out


def bench_size(n: int, densities: list[float], impls: list[str], dtype: torch.dtype,
               device: torch.device, repeat: int) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    residual = (torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype)
    work = torch.empty_like(residual)
    isz = x.element_size()
    name = device_name(device)
    copy_t = timer(lambda: x.clone(), device, repeat)
    copy_gbps = 2 * n * isz / copy_t / 1e9
    records: list[dict] = []

    def record(kernel: str, impl: str, t: Timing, traffic: float, density=None, extra=None):
        gbps = traffic / t / 1e9
        rec = dict(kernel=kernel, impl=impl, n=n, density=density, dtype=str(dtype).split(".")[-1],
                   time_us=round(t * 1e6, 1), min_us=round(t.min_s * 1e6, 1),
                   cpu_us=round(t.cpu_s * 1e6, 1), gbps=float(f"{gbps:.3g}"),
                   copy_gbps=float(f"{copy_gbps:.3g}"), frac_copy=float(f"{gbps / copy_gbps:.3g}"),
                   vs_torch_topk=None, device=name,
                   threads=torch.get_num_threads() if device.type == "cpu" else None)
        rec.update(extra or {})
        records.append(rec)
        return rec

    fns = {
        "torch": dict(topk=K.topk_magnitude_torch, ef=K.topk_error_feedback_torch,
                      quant=K.quantize_torch, dequant=K.dequantize_torch,
                      pack=K.pack_sparse_torch, unpack=K.unpack_sparse_torch,
                      scatter=K.scatter_add_torch_),
        "triton": dict(topk=K.topk_magnitude_triton, ef=K.topk_error_feedback_triton,
                       quant=K.quantize_triton, dequant=K.dequantize_triton,
                       pack=K.pack_sparse_triton, unpack=K.unpack_sparse_triton,
                       scatter=K.scatter_add_triton_),
    }
    for density in densities:
        k = max(1, int(n * density))
        base_t = timer(lambda: torch.topk(x.abs(), k, sorted=False), device, repeat)
        record("torch.topk", "torch", base_t, n * isz, density, dict(vs_torch_topk=1.0))
        for impl in impls:
            f = fns[impl]
            for exact in (True, False):
                t = timer(lambda: f["topk"](x, k, exact=exact), device, repeat)
                count = f["topk"](x, k, exact=exact)[1].numel()
                record("topk_exact" if exact else "topk_approx", impl, t, n * isz, density,
                       dict(vs_torch_topk=round(base_t / t, 2), count_over_k=round(count / k, 4)))
            t = timer(lambda: f["ef"](x, work, k, exact=False), device, repeat,
                      setup=lambda: work.copy_(residual))
            record("topk_error_feedback", impl, t, 3 * n * isz, density)
            values, indices = f["topk"](x, k)
            bufsize = K.packed_nbytes(k, dtype, n)
            t = timer(lambda: f["unpack"](f["pack"](values, indices, n), dtype, n), device, repeat)
            record("pack+unpack", impl, t, 2 * (k * (isz + 8) + 2 * bufsize), density)
            dense = torch.zeros_like(x)
            t = timer(lambda: f["scatter"](dense, indices, values), device, repeat)
            record("scatter_add_", impl, t, k * (2 * isz + 8), density)
    for impl in impls:
        f = fns[impl]
        for bits in (8, 4, 1):
            t = timer(lambda: f["quant"](x, bits, 256), device, repeat)
            record(f"quantize int{bits}" if bits > 1 else "quantize 1-bit", impl, t,
                   n * isz + K.quantized_nbytes(n, bits, 256))
        t = timer(lambda: f["quant"](x, 8, 256, residual=work), device, repeat,
                  setup=lambda: work.copy_(residual))
        record("quantize int8 + EF", impl, t, 3 * n * isz + K.quantized_nbytes(n, 8, 256))
        q = f["quant"](x, 8, 256)
        t = timer(lambda: f["dequant"](q), device, repeat)
        record("dequantize int8", impl, t, n * isz + K.quantized_nbytes(n, 8, 256))
    t = timer(lambda: K.idct_chunks(K.dct_chunks(x, 64)), device, repeat)
    record("dct+idct (chunk 64)", "torch", t, 4 * n * isz)
    return records


COLUMNS = ["kernel", "impl", "n", "density", "time_us", "min_us", "cpu_us", "gbps", "frac_copy",
           "vs_torch_topk", "count_over_k"]


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no records)\n"
    threads = f", {records[0]['threads']} torch thread(s)" if records[0].get("threads") else ""
    lines = [f"Device: {records[0]['device']}{threads}; dtype {records[0]['dtype']}. GB/s = the "
             "kernel's compulsory memory traffic / time; frac_copy = that / the copy "
             "bandwidth of a torch clone of the same size; vs_torch_topk = torch.topk time / "
             "time (same k). time_us: median wall time, min_us: fastest run, cpu_us: median "
             "process CPU time (all threads).", ""]
    lines.append("| " + " | ".join(COLUMNS) + " | copy GB/s |")
    lines.append("|" + "---|" * (len(COLUMNS) + 1))
    for r in records:
        cells = ["" if r.get(c) is None else str(r.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + f" | {r['copy_gbps']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="comma-separated element counts (k/m suffixes)")
    ap.add_argument("--densities", default=DENSITIES)
    ap.add_argument("--impls", help="triton,torch (default: both on CUDA, torch on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine idle OpenMP "
                         "threads spin and distort both wall and CPU time)")
    ap.add_argument("--quick", action="store_true", help="smallest sweep")
    ap.add_argument("--json", help="write the records (a JSON list) here")
    ap.add_argument("--markdown", help="write a markdown table here")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes or (QUICK_SIZES if args.quick else GPU_SIZES if cuda else CPU_SIZES)
    impls = [s.strip() for s in (args.impls or ("triton,torch" if cuda else "torch")).split(",")]
    for impl in impls:
        if impl not in ("triton", "torch"):
            raise SystemExit(f"unknown impl {impl!r}")
    if "triton" in impls and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--impls triton on CPU needs TRITON_INTERPRET=1 (and tiny sizes)")
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, device, sizes, impls)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device, sizes: str,
         impls: list[str]) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    densities = [float(d) for d in args.densities.split(",")]
    repeat = 1 if args.quick else args.repeat

    records: list[dict] = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for n in [parse_size(s) for s in sizes.split(",")]:
        need = 8 * n * itemsize + (64 << 20)    # x, residual, work, clone, outputs, dense
        if need > 0.8 * available_bytes(device):
            print(f"skipping n={n}: needs ~{need / 2**30:.1f} GiB", flush=True)
            continue
        t0 = time.perf_counter()
        recs = bench_size(n, densities, impls, dtype, device, repeat)
        records += recs
        print(f"n={n}: {len(recs)} records in {time.perf_counter() - t0:.1f} s", flush=True)
    print(markdown(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(records))
    return records


if __name__ == "__main__":
    main()
