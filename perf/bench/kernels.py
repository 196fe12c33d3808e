"""Benchmark of the compression kernels against torch and against a plain copy.

    python -m perf.bench.kernels [--sizes 16m] [--densities 0.01] [--impls cpu]
                                 [--dtype float32] [--repeat 5] [--device auto|cuda|cpu]
                                 [--threads 1] [--quick] [--json OUT] [--markdown OUT]
                                 [--out DIR]

For each size n (elements; k/m suffixes) and density rho (k = rho n) it builds every kernel
case and times them interleaved: ``repeat`` rounds, each running every case once (after an
untimed warm-up round), so that load drifting on a shared machine hits all cases alike;
each case reports its median. The cases:

* ``copy``: ``x.clone()`` of the n elements (the copy baseline);
* ``torch.topk`` of ``|x|`` (flat) and per block of ``BLOCK`` elements (the selection
  baselines);
* ``topk_exact`` / ``topk_approx`` (flat), ``topk_blocks`` (per block, rho of each block),
  ``topk_error_feedback`` (approximate): against torch.topk with the same k;
* ``pack_sparse``, ``unpack_sparse``, ``scatter_add_`` of the k selected pairs;
  ``quantize`` int8 / int4 / 1-bit, int8 with error feedback, ``dequantize`` int8 / int4 /
  1-bit; ``dct_chunks`` / ``idct_chunks`` 1-D (chunk 64) and 2-D (``[n / 1024, 1024]``,
  64 x 64 chunks): against their torch reference (``*_torch``, always timed, as rows of
  impl ``torch``).

Columns: median wall time and process CPU time; GB/s = the kernel's compulsory memory
traffic / time and ``frac_copy`` = that / the copy's GB/s (2 n itemsize / its time);
``x_copy`` = time / the copy's time; ``vs_torch`` = the baseline's time / time.

CPU (default ``--device auto`` without a GPU): n = 16M, rho = 1%, one torch thread, the
fast CPU implementations (``--impls cpu``; add ``torch`` for the selection references).
``--device cuda`` is the GPU table: n = 1M, 16M, 100M (capped by free memory), the Triton
kernels and the torch references of every kernel (for the selection kernels: what
``COMMRT_KERNELS=torch`` runs) against torch.topk, and the copy bandwidth; ``--out DIR`` writes
``DIR/kernels-<device>.json`` and ``.md`` with the device's name in both. Nothing is
written without ``--json``, ``--markdown`` or ``--out``. ``--quick``: small sizes, one
round (``python -m perf run quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import commrt.kernels as K
from perf.infra.units import parse_sizes

GPU_SIZES = "1m,16m,100m"
CPU_SIZES = "16m"
QUICK_SIZES = "64k,1m"
DENSITIES = "0.01"
BLOCK = 4096          # per-block top-k: one 64 x 64 DeMo chunk
DCT_CHUNK = 64
DCT_COLS = 1024       # the 2-D DCT runs on x viewed as [n / DCT_COLS, DCT_COLS]
IMPLS = ("triton", "cpu", "torch")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def impl_functions(impl: str) -> dict[str, Callable]:
    """The kernels of one implementation, by role (``dct``/``idct``: None for Triton, which
    has no DCT kernel: cuBLAS runs the reference)."""
    suffix = {"triton": "_triton", "cpu": "_cpu", "torch": "_torch"}[impl]

    def get(name: str) -> Callable:
        trailing = name.endswith("_")
        return getattr(K, (name[:-1] if trailing else name) + suffix + ("_" if trailing else ""))

    return dict(topk=get("topk_magnitude"), blocks=get("topk_blocks"),
                ef=get("topk_error_feedback"), pack=get("pack_sparse"),
                unpack=get("unpack_sparse"), scatter=get("scatter_add_"),
                quant=get("quantize"), dequant=get("dequantize"),
                dct=None if impl == "triton" else get("dct_chunks"),
                idct=None if impl == "triton" else get("idct_chunks"))


@dataclass
class Case:
    kernel: str
    impl: str
    fn: Callable[[], object]
    traffic: float                       # compulsory bytes moved
    baseline: str | None = None       # key of the case this one is compared with
    density: float | None = None
    setup: Callable[[], object] | None = None
    extra: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)
    cpus: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.impl}|{self.density}"


def run_interleaved(cases: list[Case], device: torch.device, repeat: int) -> None:
    """``repeat`` timed rounds (after one warm-up round), each case once per round."""
    for rnd in range(repeat + 1):
        for case in cases:
            if case.setup is not None:
                case.setup()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cpu0, start = time.process_time(), time.perf_counter()
            case.fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rnd:
                case.walls.append(time.perf_counter() - start)
                case.cpus.append(time.process_time() - cpu0)


def build_cases(n: int, densities: list[float], impls: list[str], dtype: torch.dtype,
                device: torch.device) -> list[Case]:
    gen = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    residual = (torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype)
    work = torch.empty_like(residual)
    reset = lambda: work.copy_(residual)          # noqa: E731 - untimed setup
    isz = x.element_size()
    fns = {impl: impl_functions(impl) for impl in set(impls) | {"torch"}}
    # non-selection kernels are compared with their reference: always time it
    plain_impls = list(impls) + ([] if "torch" in impls else ["torch"])
    cases = [Case("copy", "torch", lambda: x.clone(), 2 * n * isz)]
    nblk = n // BLOCK
    xb = x[:nblk * BLOCK]

    for rho in densities:
        k = max(1, int(n * rho))
        kb = max(1, int(BLOCK * rho))
        flat_base = Case("torch.topk", "torch", lambda k=k: torch.topk(x.abs(), k, sorted=False),
                         n * isz, density=rho)
        cases.append(flat_base)
        if nblk:
            block_base = Case("torch.topk per block", "torch",
                              lambda kb=kb: torch.topk(xb.view(nblk, BLOCK).abs(), kb, dim=1,
                                                       sorted=False),
                              nblk * BLOCK * isz, density=rho)
            cases.append(block_base)
        values, indices = K.topk_magnitude(x, k)
        nbytes = K.packed_nbytes(k, dtype, n)
        dense = torch.zeros_like(x)
        for impl in impls:
            f = fns[impl]
            for exact in (True, False):
                count = f["topk"](x, k, exact=exact)[1].numel()
                cases.append(Case("topk_exact" if exact else "topk_approx", impl,
                                  lambda f=f, k=k, e=exact: f["topk"](x, k, exact=e), n * isz,
                                  flat_base.key, rho, extra=dict(count_over_k=round(count / k, 4))))
            if nblk:
                cases.append(Case("topk_blocks", impl,
                                  lambda f=f, kb=kb: f["blocks"](xb, BLOCK, kb), nblk * BLOCK * isz,
                                  block_base.key, rho, extra=dict(block=BLOCK)))
            cases.append(Case("topk_error_feedback", impl,
                              lambda f=f, k=k: f["ef"](x, work, k, exact=False), 3 * n * isz,
                              flat_base.key, rho, setup=reset))
        for impl in plain_impls:
            f = fns[impl]
            pair_bytes = k * (isz + 8)
            packed = f["pack"](values, indices, n)
            # Every name bound now: the cases run after the loop over densities.
            for kernel, fn, traffic in (
                    ("pack_sparse", lambda f=f, v=values, i=indices: f["pack"](v, i, n),
                     pair_bytes + nbytes),
                    ("unpack_sparse", lambda f=f, b=packed: f["unpack"](b, dtype, n),
                     nbytes + pair_bytes),
                    ("scatter_add_",
                     lambda f=f, d=dense, v=values, i=indices: f["scatter"](d, i, v),
                     k * (2 * isz + 8))):
                cases.append(Case(kernel, impl, fn, traffic, f"{kernel}|torch|{rho}", rho))

    qcases, mat = [], (x.view(n // DCT_COLS, DCT_COLS) if n % DCT_COLS == 0 else None)
    for impl in plain_impls:
        f = fns[impl]
        for bits in (8, 4, 1):
            name = f"int{bits}" if bits > 1 else "1-bit"
            qbytes = K.quantized_nbytes(n, bits, 256)
            qcases.append(Case(f"quantize {name}", impl, lambda f=f, b=bits: f["quant"](x, b, 256),
                               n * isz + qbytes))
            q = f["quant"](x, bits, 256)
            qcases.append(Case(f"dequantize {name}", impl, lambda f=f, q=q: f["dequant"](q),
                               qbytes + n * isz))
        qcases.append(Case("quantize int8 + EF", impl,
                           lambda f=f: f["quant"](x, 8, 256, residual=work),
                           3 * n * isz + K.quantized_nbytes(n, 8, 256), setup=reset))
        if f["dct"] is None:
            continue
        coeffs = f["dct"](x, DCT_CHUNK)
        qcases += [Case("dct_chunks 1-D", impl, lambda f=f: f["dct"](x, DCT_CHUNK), 2 * n * isz),
                   Case("idct_chunks 1-D", impl, lambda f=f, c=coeffs: f["idct"](c), 2 * n * isz)]
        if mat is not None:
            coeffs2 = f["dct"](mat, DCT_CHUNK)
            qcases += [Case("dct_chunks 2-D", impl, lambda f=f: f["dct"](mat, DCT_CHUNK),
                            2 * n * isz),
                       Case("idct_chunks 2-D", impl, lambda f=f, c=coeffs2: f["idct"](c),
                            2 * n * isz)]
    for case in qcases:
        case.baseline = f"{case.kernel}|torch|None"
    return cases + qcases


def records_of(cases: list[Case], n: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    name = device_name(device)
    med = {c.key: statistics.median(c.walls) for c in cases}
    copy_t = med["copy|torch|None"]
    copy_gbps = 2 * n * torch.empty(0, dtype=dtype).element_size() / copy_t / 1e9
    records = []
    for c in cases:
        t = med[c.key]
        gbps = c.traffic / t / 1e9
        base = c.baseline or (c.key if c.kernel.startswith("torch.topk") else None)
        rec = dict(kernel=c.kernel, impl=c.impl, n=n, density=c.density,
                   dtype=str(dtype).split(".")[-1], time_us=round(t * 1e6, 1),
                   min_us=round(min(c.walls) * 1e6, 1),
                   cpu_us=round(statistics.median(c.cpus) * 1e6, 1),
                   gbps=float(f"{gbps:.3g}"), copy_gbps=float(f"{copy_gbps:.3g}"),
                   frac_copy=float(f"{gbps / copy_gbps:.3g}"),
                   x_copy=float(f"{t / copy_t:.3g}"),
                   baseline=None if base is None else base.split("|")[0],
                   vs_torch=None if base is None else float(f"{med[base] / t:.3g}"),
                   device=name, repeat=len(c.walls),
                   threads=torch.get_num_threads() if device.type == "cpu" else None)
        rec.update(c.extra)
        records.append(rec)
    return records


COLUMNS = ["kernel", "impl", "n", "density", "time_us", "cpu_us", "gbps", "frac_copy", "x_copy",
           "baseline", "vs_torch", "count_over_k"]


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no records)\n"
    r0 = records[0]
    threads = f", {r0['threads']} torch thread(s)" if r0.get("threads") else ""
    lines = [f"Device: {r0['device']}{threads}; dtype {r0['dtype']}; {r0['repeat']} interleaved "
             "rounds, medians. time_us: wall time, cpu_us: process CPU time (all threads). "
             "GB/s = the kernel's compulsory memory traffic / time; frac_copy = that / the "
             "copy's GB/s (x.clone(), 2 n itemsize bytes); x_copy = time / the copy's time; "
             "vs_torch = the baseline's time / time (torch.topk with the same k for the "
             "selection kernels, the torch reference otherwise).", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in records:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c))
                                       for c in COLUMNS) + " |")
    copies = sorted({(r["n"], r["copy_gbps"]) for r in records})
    lines += ["", "Copy bandwidth: " + ", ".join(f"n = {n}: {g} GB/s" for n, g in copies)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="comma-separated element counts (k/m suffixes); default "
                    f"{CPU_SIZES} on CPU, {GPU_SIZES} on CUDA")
    ap.add_argument("--densities", default=DENSITIES)
    ap.add_argument("--impls", help="of triton,cpu,torch (default: triton,torch on CUDA, cpu "
                                    "on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--repeat", type=int, default=5, help="timed interleaved rounds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine idle OpenMP "
                         "threads spin and distort both wall and CPU time)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round")
    ap.add_argument("--json", help="write the records (a JSON list) here")
    ap.add_argument("--markdown", help="write a markdown table here")
    ap.add_argument("--out", help="write kernels-<device>.json and .md into this directory")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes or (QUICK_SIZES if args.quick else GPU_SIZES if cuda else CPU_SIZES)
    # On CUDA the torch rows of the selection kernels are what COMMRT_KERNELS=torch runs:
    # the alternative to Triton there, timed beside it.
    impls = [s.strip() for s in (args.impls or ("triton,torch" if cuda else "cpu")).split(",")]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown impl {impl!r} (expected some of {', '.join(IMPLS)})")
    if "cpu" in impls and cuda:
        raise SystemExit("--impls cpu needs --device cpu")
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
    repeat = 1 if args.quick else max(1, args.repeat)

    records: list[dict] = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for n in parse_sizes(sizes):
        need = 12 * n * itemsize + (64 << 20)   # x, residual, work, dense, copies, outputs
        if need > 0.8 * available_bytes(device):
            print(f"skipping n={n}: needs ~{need / 2**30:.1f} GiB", flush=True)
            continue
        t0 = time.perf_counter()
        cases = build_cases(n, densities, impls, dtype, device)
        run_interleaved(cases, device, repeat)
        recs = records_of(cases, n, dtype, device)
        records += recs
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"n={n}: {len(recs)} records in {time.perf_counter() - t0:.1f} s", flush=True)
    table = markdown(records)
    print(table)
    outputs = []
    if args.out:
        slug = device_slug(device_name(device))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        outputs = [(Path(args.out) / f"kernels-{slug}.json", Path(args.out) / f"kernels-{slug}.md")]
    if args.json or args.markdown:
        outputs.append((args.json and Path(args.json), args.markdown and Path(args.markdown)))
    for json_path, md_path in outputs:
        if json_path:
            json_path.write_text(json.dumps(records, indent=1))
        if md_path:
            md_path.write_text(table)
    return records


if __name__ == "__main__":
    main()
