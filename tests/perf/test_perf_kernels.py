"""perf/bench/kernels.py runs end to end at tiny size (the fast CPU kernels, and the Triton path
under the interpreter) and writes well-formed records only when asked, so the benchmark
cannot rot."""
import json

import perf.bench.kernels as bench

EVERY_KERNEL = {"copy", "torch.topk", "torch.topk per block", "topk_exact", "topk_approx",
                "topk_blocks", "topk_error_feedback", "pack_sparse", "unpack_sparse",
                "scatter_add_", "quantize int8", "quantize int4", "quantize 1-bit",
                "quantize int8 + EF", "dequantize int8", "dequantize int4", "dequantize 1-bit",
                "dct_chunks 1-D", "idct_chunks 1-D", "dct_chunks 2-D", "idct_chunks 2-D"}


def test_kernel_perf_script_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "k.json"
    md = tmp_path / "k.md"
    records = bench.main(["--sizes", "8k", "--densities", "0.01", "--repeat", "2",
                          "--device", "cpu", "--json", str(out), "--markdown", str(md),
                          "--out", str(tmp_path / "dir")])
    loaded = json.loads(out.read_text())
    assert loaded == records and records
    assert {r["kernel"] for r in records} == EVERY_KERNEL
    assert {r["impl"] for r in records} == {"cpu", "torch"}
    by_key = {(r["kernel"], r["impl"]): r for r in records}
    for r in records:
        assert r["time_us"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 and r["n"] == 8192
        assert r["repeat"] == 2 and r["threads"] == 1 and r["x_copy"] > 0
        if r["kernel"] != "copy":
            assert r["baseline"] and r["vs_torch"] > 0, r
    for kernel in ("topk_exact", "topk_approx", "topk_error_feedback"):
        assert by_key[(kernel, "cpu")]["baseline"] == "torch.topk"
    assert by_key[("topk_blocks", "cpu")]["baseline"] == "torch.topk per block"
    assert by_key[("quantize int8 + EF", "cpu")]["baseline"] == "quantize int8 + EF"
    assert by_key[("quantize int8", "torch")]["vs_torch"] == 1.0
    assert by_key[("topk_exact", "cpu")]["count_over_k"] == 1.0
    assert "| kernel |" in md.read_text() and "Copy bandwidth" in md.read_text()
    # --out: files named after the device, the device's name inside
    written = sorted(p.name for p in (tmp_path / "dir").iterdir())
    slug = bench.device_slug(records[0]["device"])
    assert written == [f"kernels-{slug}.json", f"kernels-{slug}.md"]
    assert records[0]["device"] in (tmp_path / "dir" / f"kernels-{slug}.md").read_text()


def test_kernel_perf_script_writes_nothing_unasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = bench.main(["--sizes", "2k", "--repeat", "1", "--device", "cpu"])
    assert records and not list(tmp_path.iterdir())


def test_kernel_perf_script_triton_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    records = bench.main(["--sizes", "1k", "--densities", "0.05", "--repeat", "1",
                          "--device", "cpu", "--impls", "triton"])
    assert {r["impl"] for r in records} == {"triton", "torch"}   # baselines and references
    assert any(r["kernel"] == "topk_approx" and r["impl"] == "triton" for r in records)
    assert any(r["kernel"] == "quantize int8 + EF" and r["impl"] == "triton" for r in records)
