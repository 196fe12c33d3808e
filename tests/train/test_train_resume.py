"""`python -m commrt.train`: same seed same losses, resume == uninterrupted, outputs, .bin data.

Resume is exact: for every deterministic method, a run stopped (`--stop-at`) and continued
(`--resume`) ends bit-identical to an uninterrupted one: the same final losses and the same
final checkpoint, every tensor compared with torch.equal (parameters, optimizer moments,
error-feedback residuals, adaptive collective state) and every other value with ==. One
launch per method family, several methods per launch, each with the options that give it
state worth losing (SparDL teams for the adaptive h, EDiT's sparse/quantized exchange across
emulated nodes, FlexDeMo across nodes).

Not covered, non-deterministic by design: `aedit` (a round lasts a wall-clock interval, so
the number of inner steps per round depends on timing) and `acco`/`dpu` without
`--micro-batches` (compute keeps accumulating micro-batches until the round in flight
finishes, so the count depends on timing); both differ between two uninterrupted runs too.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from harness import run_ranks

ARGS = ["--model", "tiny", "--steps", "20", "--batch-size", "4", "--log-interval", "5",
        "--eval-interval", "10", "--eval-iters", "2", "--corpus-bytes", "300000", "--quiet"]


def _losses(summary):
    return [(r["step"], r["loss"], r["val_loss"]) for r in summary["records"]]


def _assert_same(a, b, what):
    assert [s for s, _, _ in a] == [s for s, _, _ in b], (what, a, b)
    for (step, la, va), (_, lb, vb) in zip(a, b):
        for x, y in ((la, lb), (va, vb)):
            assert (x is None) == (y is None), (what, step, x, y)
            assert x == y, (what, step, x, y)


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
            assert {"step", "loss", "val_loss", "tokens", "wall_s", "wire_bytes",
                    "comm_s"} <= set(r)
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


# The smallest run that still exercises the state: checkpoints at 2 and 4, stop at 4, so the
# resumed run loads a state that has seen a bucket rebuild, an EDiT synchronization, etc.
# A small text file as data: finding the default stdlib corpus costs seconds per run.
EXACT_ARGS = ["--model", "tiny", "--steps", "6", "--batch-size", "2", "--log-interval", "2",
              "--eval-interval", "100", "--eval-iters", "1", "--checkpoint-every", "2",
              "--threads", "1", "--quiet"]
STOP = 4


def _assert_equal_state(a, b, path: str) -> None:
    """Bit-identical nested checkpoint state: tensors by torch.equal, arrays by
    np.array_equal, the rest by ==."""
    import torch

    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), \
            (path, (a.double() - b.double()).abs().max().item() if a.shape == b.shape else a.shape)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _assert_equal_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _resume_exact_worker(out_root: str, text_path: str, runs: list[list[str]]) -> None:
    import torch

    from commrt import train
    from commrt import transports as T

    rank = T.world().rank
    for options in runs:
        name = "_".join(o.lstrip("-") for o in options)
        options = [*options, "--data", text_path]
        full = train.main([*EXACT_ARGS, *options, "--out", f"{out_root}/{name}/full"])
        cut = train.main([*EXACT_ARGS, *options, "--out", f"{out_root}/{name}/cut",
                          "--stop-at", str(STOP)])
        assert cut["stopped_at"] == STOP, (options, cut)
        T.world().barrier()
        resumed = train.main([*EXACT_ARGS, *options, "--out", f"{out_root}/{name}/cut",
                              "--resume"])
        a, b = full["records"][-1], resumed["records"][-1]
        assert a["step"] == b["step"] == 6, (options, a, b)
        assert (a["loss"], a["val_loss"]) == (b["loss"], b["val_loss"]), (options, a, b)
        saved = [torch.load(Path(out_root, name, run, "checkpoint", "step-0000006",
                                 f"rank-{rank:05d}.pt"), weights_only=False)
                 for run in ("full", "cut")]
        for key in ("step", "method", "sampler", "torch_rng", "python_rng", "numpy_rng"):
            _assert_equal_state(saved[0][key], saved[1][key], f"{' '.join(options)}: {key}")
    # an option the training math depends on may not change at a resume (exit 2, every rank)
    try:
        train.main([*EXACT_ARGS, *options, "--beta1", "0.8", "--out", f"{out_root}/{name}/cut",
                    "--resume"])
    except SystemExit as exc:
        assert exc.code == 2, exc.code
    else:
        raise AssertionError("--resume with another --beta1 was accepted")


# One launch per family; each entry is one method's options.
RESUME_FAMILIES = {
    "ddp": [["--method", "ddp"],
            ["--method", "spardl", "--density", "0.05"],
            ["--method", "spardl", "--density", "0.05", "--teams", "2"],   # adaptive h
            # threshold reuse: the kept thresholds and their ages resume with the hook
            ["--method", "spardl", "--density", "0.05", "--reuse-steps", "3"],
            ["--method", "topka", "--density", "0.05"],
            ["--method", "gtopk", "--density", "0.05"],
            ["--method", "quant8"],
            ["--method", "quant1"]],
    "zero1-acco": [["--method", "zero1"],
                   ["--method", "acco", "--micro-batches", "1"],
                   ["--method", "dpu", "--micro-batches", "2"]],
    "demo": [["--method", "demo"],
             ["--method", "flexdemo", "--ranks-per-node", "1", "--flex-base", "adamw"]],
    # --ranks-per-node 1: two emulated nodes, so the outer exchange crosses them.
    "edit": [["--method", "edit", "--sync-interval", "2", "--warmup-steps", "1",
              "--ranks-per-node", "1", *exchange]
             for exchange in (["--exchange", "dense"],
                              ["--exchange", "sparse", "--density", "0.05"],
                              ["--exchange", "quantized"])],
    "cdp": [["--method", "cdp"],
            ["--method", "cdp", "--rule", "v2", "--stages", "3"],
            ["--method", "cdp", "--sharded"]],
}


@pytest.mark.parametrize("family", list(RESUME_FAMILIES))
def test_train_resume_exact(tmp_path, family):
    # printable bytes with some structure (a random walk over a 40-letter alphabet)
    steps = np.random.default_rng(0).integers(-3, 4, size=40_000)
    (tmp_path / "text.txt").write_bytes((np.cumsum(steps) % 40 + 48).astype(np.uint8).tobytes())
    run_ranks(_resume_exact_worker, 2, timeout=300, out_root=str(tmp_path),
              text_path=str(tmp_path / "text.txt"), runs=RESUME_FAMILIES[family])
