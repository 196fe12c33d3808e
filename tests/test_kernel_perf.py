"""perf/kernels.py runs end to end at tiny size (references, and the Triton path under the
interpreter) and writes well-formed records, so the benchmark cannot rot."""
import json

import perf.kernels as bench


def test_kernel_perf_script_tiny(tmp_path, monkeypatch):
    out = tmp_path / "k.json"
    md = tmp_path / "k.md"
    records = bench.main(["--sizes", "2k", "--densities", "0.01", "--repeat", "1",
                          "--device", "cpu", "--json", str(out), "--markdown", str(md)])
    loaded = json.loads(out.read_text())
    assert loaded == records and records
    kernels = {r["kernel"] for r in records}
    assert {"torch.topk", "topk_exact", "topk_approx", "topk_error_feedback", "quantize int8",
            "quantize 1-bit", "dequantize int8", "pack+unpack", "scatter_add_"} <= kernels
    for r in records:
        assert r["time_us"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 and r["n"] == 2048
    assert all(r["count_over_k"] == 1.0 for r in records if r["kernel"] == "topk_exact")
    assert "| kernel |" in md.read_text()


def test_kernel_perf_script_triton_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    records = bench.main(["--sizes", "1k", "--densities", "0.05", "--repeat", "1",
                          "--device", "cpu", "--impls", "triton"])
    assert {r["impl"] for r in records} == {"triton", "torch"}   # torch.topk, dct baselines
    assert any(r["kernel"] == "topk_approx" and r["impl"] == "triton" for r in records)
