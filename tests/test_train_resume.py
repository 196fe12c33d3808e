"""`python -m commrt.train`: same seed same losses, resume == uninterrupted, outputs, .bin data."""
import json
from pathlib import Path

import numpy as np

from mpi_harness import run_ranks

ARGS = ["--model", "tiny", "--steps", "20", "--batch-size", "4", "--log-interval", "5",
        "--eval-interval", "10", "--eval-iters", "2", "--corpus-bytes", "300000", "--quiet"]


def _losses(summary):
    return [(r["step"], r["loss"], r["val_loss"]) for r in summary["records"]]


def _assert_same(a, b, what):
    assert [s for s, _, _ in a] == [s for s, _, _ in b], (what, a, b)
    for (step, la, va), (_, lb, vb) in zip(a, b):
        for x, y in ((la, lb), (va, vb)):
            assert (x is None) == (y is None), (what, step, x, y)
            assert x is None or abs(x - y) <= 1e-6 * abs(x), (what, step, x, y)


def _resume_worker(out_root: str, bin_path: str) -> None:
    from commrt import train
    from commrt import transports as T

    rank = T.world().rank
    # spardl with 3 teams on 3 ranks: error-feedback residuals and the adaptive h are state
    method = ["--method", "spardl", "--density", "0.05", "--teams", "3", "--seed", "3"]
    full = train.main([*ARGS, *method, "--out", f"{out_root}/full", "--plot"])
    again = train.main([*ARGS, *method, "--out", f"{out_root}/again"])
    _assert_same(_losses(full), _losses(again), "same seed")
    other = train.main([*ARGS, *method[:-1], "4", "--out", f"{out_root}/other"])
    assert _losses(other)[1][1] != _losses(full)[1][1], "another seed gave the same loss"

    first = train.main([*ARGS, *method, "--out", f"{out_root}/cut", "--checkpoint-every", "10",
                        "--stop-at", "10"])
    assert first["stopped_at"] == 10
    T.world().barrier()
    resumed = train.main([*ARGS, *method, "--out", f"{out_root}/cut", "--checkpoint-every", "10",
                          "--resume"])
    # the resumed run's records continue the interrupted one's; metrics.jsonl holds both
    if rank == 0:
        lines = (Path(out_root) / "cut" / "metrics.jsonl").read_text().splitlines()
        from_file = [json.loads(line) for line in lines]
        _assert_same([(r["step"], r["loss"], r["val_loss"]) for r in from_file], _losses(full),
                     "resumed vs uninterrupted (metrics.jsonl)")
        for r in from_file:
            assert {"step", "loss", "val_loss", "tokens", "wall_s", "wire_bytes", "comm_s"} <= set(r)
        assert from_file[-1]["tokens"] == 20 * 3 * 4 * 64
        summary = json.loads((Path(out_root) / "full" / "summary.json").read_text())
        assert summary["method"] == "spardl" and summary["world_size"] == 3
        assert summary["final_val_loss"] == full["final_val_loss"]
        assert (Path(out_root) / "full" / "loss.png").stat().st_size > 10_000
        latest = (Path(out_root) / "cut" / "checkpoint" / "latest").read_text()
        assert latest == "step-0000020"
        assert sorted(p.name for p in (Path(out_root) / "cut" / "checkpoint").iterdir()) == \
            ["latest", "step-0000020"]
    _assert_same(_losses(resumed)[-2:], _losses(full)[-2:], "resumed vs uninterrupted")

    # pre-tokenized uint16 data with ids above 255: vocabulary inferred from the largest id
    bin_run = train.main([*ARGS, "--method", "ddp", "--data", bin_path, "--steps", "30",
                          "--out", f"{out_root}/bin"])
    assert bin_run["model_config"]["vocab_size"] == 300
    assert bin_run["final_val_loss"] < bin_run["start_val_loss"] - 1.0, bin_run["final_val_loss"]


def test_train_resume_seed_outputs_bin(tmp_path):
    # a learnable token stream: a fixed random walk over 300 ids with period 97
    pattern = np.random.default_rng(0).integers(0, 300, size=97)
    pattern[0] = 299
    np.tile(pattern, 200).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    run_ranks(_resume_worker, 3, timeout=400, out_root=str(tmp_path),
              bin_path=str(tmp_path / "tokens.bin"))
