"""Every --method of `python -m commrt.train` trains the tiny GPT for 50 steps at 4 ranks
with a falling loss; spardl at density 0.01 puts at most 1/10 of ddp's bytes on the wire."""

from harness import run_ranks

DATA_PARALLEL = ["ddp", "spardl", "topka", "gtopk", "quant8", "quant1"]
OTHERS = ["demo", "flexdemo", "edit", "aedit", "acco", "zero1", "dpu", "cdp"]
COMMON = ["--model", "tiny", "--steps", "50", "--batch-size", "4", "--log-interval", "10",
          "--eval-interval", "50", "--eval-iters", "2", "--corpus-bytes", "400000", "--quiet",
          "--seed", "0"]
EXTRA = {"spardl": ["--density", "0.01"], "flexdemo": ["--ranks-per-node", "2"],
         "edit": ["--ranks-per-node", "2", "--sync-interval", "4", "--warmup-steps", "5"],
         "aedit": ["--ranks-per-node", "2", "--sync-seconds", "0.3", "--warmup-steps", "5"],
         "cdp": ["--stages", "2"]}


def _methods_worker(methods: list, out_root: str) -> None:
    from commrt import train

    summaries = {}
    for method in methods:
        summary = train.main(["--method", method, "--out", f"{out_root}/{method}", *COMMON,
                              *EXTRA.get(method, [])])
        train_losses = [r["loss"] for r in summary["records"] if r["loss"] is not None]
        assert summary["steps"] == 50 and len(train_losses) == 5, (method, summary["steps"])
        # loss falls: from ln(256) ≈ 5.55 at the start, clearly lower at the end
        assert summary["start_val_loss"] > 5.3, (method, summary["start_val_loss"])
        assert summary["final_val_loss"] < summary["start_val_loss"] - 1.0, (
            method, summary["start_val_loss"], summary["final_val_loss"])
        assert train_losses[-1] < train_losses[0] - 0.5, (method, train_losses)
        assert summary["tokens"] >= 50 * 4 * 4 * 64, (method, summary["tokens"])
        summaries[method] = summary
    if "ddp" in summaries and "spardl" in summaries:
        dense = summaries["ddp"]["wire_bytes_per_step"]
        sparse = summaries["spardl"]["wire_bytes_per_step"]
        # the dense ring allreduce of the fp32 model: 2(P-1)/P · 4n bytes per rank and step
        n = summaries["ddp"]["parameters"]
        assert abs(dense - 2 * 3 / 4 * 4 * n) < 0.01 * dense, (dense, n)
        assert 0 < sparse <= dense / 10, (sparse, dense)


def test_train_data_parallel_methods(tmp_path):
    run_ranks(_methods_worker, 4, timeout=400, methods=DATA_PARALLEL, out_root=str(tmp_path))


def test_train_other_methods(tmp_path):
    run_ranks(_methods_worker, 4, timeout=500, methods=OTHERS, out_root=str(tmp_path))
