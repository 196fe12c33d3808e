"""Training comparison: every method of ``python -m commrt.train`` on the same emulated link.

    python -m perf.bench.train_bench --link 1gbit --nprocs 4 --steps 60 --out DIR [--json OUT]

Each method trains the same model from the same seed on the same data, one ``mpirun`` job per
method over the same link (perf/infra/netem.py; ``--ranks-per-node R`` uses the two-tier emulation
and is passed to the hybrid methods). From each run's ``metrics.jsonl`` and ``summary.json``:

* **time to target**: the training wall-clock (``wall_s``, process start-up excluded) of the
  first evaluation whose validation loss is at or below the target. The target defaults to
  the loss at which the dense baseline (ddp) has made 95% of its improvement,
  start − 0.95·(start − best); ``--target-loss`` sets it.
* **loss vs wall clock**: ``DIR/loss_vs_wall.png`` (validation loss of every method).
* **bytes per step** (wire bytes per rank from the transport counters) and **exposed
  communication**: ``comm_s``, step time minus compute-only step time, as a share of wall time.

Writes ``DIR/<method>/`` (the training runs), ``DIR/summary.json`` and ``--json`` records
(bench "train", one per method).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commrt.optim.registry import METHODS
from commrt.training.metrics import pyplot
from perf.infra.launch import launch_mpi
from perf.infra.netem import LinkUnavailable

# The methods on a 2-D mesh of nodes: they take --ranks-per-node.
HYBRID = ("flexdemo", "edit", "aedit")
TINY_METHODS = ("ddp", "spardl")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to_target(metrics: list[dict], target: float) -> float | None:
    """wall_s of the first evaluation with val_loss <= target, None if never reached."""
    for m in metrics:
        if m.get("val_loss") is not None and m["val_loss"] <= target:
            return float(m["wall_s"])
    return None


def default_target(results: dict[str, dict], baseline: str = "ddp") -> float | None:
    """Loss at 95% of the baseline's improvement (or of the best method's, if no baseline)."""
    ok = {m: r for m, r in results.items() if r.get("val_curve")}
    if not ok:
        return None
    base = ok.get(baseline) or min(ok.values(), key=lambda r: min(v for _, v in r["val_curve"]))
    start = base["val_curve"][0][1]
    best = min(v for _, v in base["val_curve"])
    return start - 0.95 * (start - best)


def aedit_rounds(steps: int, warmup_steps: int, sync_interval: int) -> int:
    """A-EDiT rounds that see about the tokens of `steps` steps: warm-up steps count one
    each, then each round of ``--sync-seconds 0`` lasts about `sync_interval` local steps."""
    if steps <= warmup_steps:
        return steps
    return warmup_steps + -(-(steps - warmup_steps) // sync_interval)


# commrt.train's defaults, passed explicitly so the round count above stays right.
AEDIT_WARMUP, AEDIT_INTERVAL = 10, 8


def run_training(entry: dict[str, Any], nprocs: int, cmd: list[str], run_dir: Path, *,
                 link: str, ranks_per_node: int | None, timeout: float) -> dict[str, Any]:
    """Run ``mpirun -n nprocs python -m commrt.train *cmd`` over `link` (its ``--out`` is
    `run_dir`) and fill `entry` with the job's status and the run's results: curves, final
    validation loss, wall clock, steps, tokens, wire bytes and exposed communication."""
    # commrt.train appends to metrics.jsonl (so that --resume continues a curve): a stale
    # run in the same folder would prepend its records to this one's curve.
    for stale in ("metrics.jsonl", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        proc = launch_mpi(nprocs, "commrt.train", cmd, link=link, ranks_per_node=ranks_per_node,
                          timeout=timeout, check=False)
        entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        if proc.returncode != 0:
            entry["error"] = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
    except subprocess.TimeoutExpired:
        entry["status"] = f"timeout ({timeout:.0f}s)"
    entry["job_wall_s"] = round(time.perf_counter() - start, 1)
    metrics = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    entry["val_curve"] = [(float(m["wall_s"]), float(m["val_loss"])) for m in metrics
                          if m.get("val_loss") is not None]
    entry["loss_curve"] = [(float(m["wall_s"]), float(m["loss"])) for m in metrics
                           if m.get("loss") is not None]
    steps = summary.get("steps") or (metrics[-1]["step"] if metrics else None)
    wall = summary.get("wall_s") or (metrics[-1]["wall_s"] if metrics else None)
    comm = summary.get("comm_s")
    if comm is None and metrics:
        comm = sum(float(m.get("comm_s") or 0.0) for m in metrics)
    entry.update(
        final_val_loss=summary.get("final_val_loss",
                                   entry["val_curve"][-1][1] if entry["val_curve"] else None),
        train_wall_s=wall, steps=steps, tokens=summary.get("tokens"),
        bytes_per_step=summary.get("wire_bytes_per_step"),
        comm_s=comm, exposed_comm_share=(comm / wall) if comm is not None and wall else None,
        step_ms=(1e3 * wall / steps) if wall and steps else None,
        tok_per_s=summary.get("tok_per_s"))
    return entry


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / method
    steps = args.steps
    if method == "aedit":
        # A-EDiT's step is a round: rounds of AEDIT_INTERVAL measured steps, equal tokens.
        steps = aedit_rounds(args.steps, AEDIT_WARMUP, AEDIT_INTERVAL)
    cmd = ["--method", method, "--steps", str(steps), "--model", args.model,
           "--log-interval", str(args.log_interval), "--eval-interval", str(args.eval_interval),
           "--eval-iters", str(args.eval_iters), "--out", str(run_dir), "--quiet",
           "--seed", str(args.seed), *args.train_args]
    if method in HYBRID:
        rpn = args.ranks_per_node or (2 if args.nprocs % 2 == 0 else 1)
        cmd += ["--ranks-per-node", str(rpn)]
    if method == "aedit":
        cmd += ["--sync-seconds", "0", "--warmup-steps", str(AEDIT_WARMUP),
                "--sync-interval", str(AEDIT_INTERVAL)]
    entry: dict[str, Any] = dict(method=method, link=args.link, world_size=args.nprocs)
    run_training(entry, args.nprocs, cmd, run_dir, link=args.link,
                 ranks_per_node=args.ranks_per_node, timeout=args.timeout)
    print(f"  [{entry['status']}] {method}: final val {entry['final_val_loss']}, "
          f"{entry['job_wall_s']} s", flush=True)
    return entry


def run_methods(methods: list[str], args: argparse.Namespace, out: Path,
                run: Callable[[str, argparse.Namespace, Path], dict[str, Any]],
                prog: str, hint: str = "") -> dict[str, dict]:
    """{method: run(method, args, out)} for every method in turn; a link that cannot be
    emulated ends the program (exit status 2, naming `prog`, with `hint`)."""
    results: dict[str, dict] = {}
    try:
        for method in methods:
            results[method] = run(method, args, out)
    except LinkUnavailable as exc:
        print(f"{prog}: {exc}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    return results


def plot(results: dict[str, dict], target: float | None, path: Path, title: str) -> Path | None:
    curves = {m: r["val_curve"] for m, r in results.items() if r.get("val_curve")}
    if not curves:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=method)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8, label=f"target {target:.3f}")
    ax.set_xlabel("training wall clock (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report_section(summary: dict, out_dir: Path | None = None) -> str:
    """Markdown: the comparison table (sorted by time to target) and the plot."""
    target = summary.get("target_loss")
    rows = sorted(summary["methods"], key=lambda r: (r.get("time_to_target_s") is None,
                                                    r.get("time_to_target_s") or 0.0,
                                                    r.get("final_val_loss") or 1e9))
    lines = [f"{summary.get('world_size')} ranks, link {summary.get('link')}, model "
             f"{summary.get('model')}, {summary.get('steps')} steps; target validation loss "
             f"{target:.4f} ({summary.get('target_rule')})." if target is not None else
             "no target loss (no run produced validation losses).", "",
             "| method | status | time to target (s) | final val loss | tokens | train wall (s) "
             "| step (ms) | wire bytes/step/rank | exposed comm |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    for r in rows:
        ttt = r.get("time_to_target_s")
        lines.append(f"| {r['method']} | {r['status']} | "
                     f"{f(ttt, '.1f') if ttt is not None else 'not reached'} | "
                     f"{f(r.get('final_val_loss'), '.4f')} | {f(r.get('tokens'), ',d')} | "
                     f"{f(r.get('train_wall_s'), '.1f')} | "
                     f"{f(r.get('step_ms'), '.0f')} | {f(r.get('bytes_per_step'), ',.0f')} | "
                     f"{f(r.get('exposed_comm_share') and 100 * r['exposed_comm_share'], '.0f')}"
                     f"{'%' if r.get('exposed_comm_share') is not None else ''} |")
    if summary.get("plot"):
        lines += ["", f"![loss vs wall clock](train/{Path(summary['plot']).name})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench.train_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--link", default="shm")
    parser.add_argument("--nprocs", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma list (default: all of commrt.train)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--eval-iters", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--target-loss", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per method")
    parser.add_argument("--tiny", action="store_true", help="ddp and spardl, a few steps")
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("train_args", nargs="*", help="extra arguments for commrt.train (after --)")
    args = parser.parse_args(argv)
    offered = list(METHODS)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in offered]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; commrt.train offers {offered}")
    else:
        methods = list(TINY_METHODS) if args.tiny else offered
    if args.tiny:
        args.steps, args.log_interval, args.eval_interval = min(args.steps, 6), 2, 3
        args.eval_iters = 1
        args.train_args = ["--corpus-bytes", str(1 << 18), *args.train_args]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_methods(methods, args, out, run_method, "perf.bench.train_bench")
    target = args.target_loss if args.target_loss is not None else default_target(results)
    rule = ("given" if args.target_loss is not None
            else "95% of ddp's improvement" if "ddp" in results and results["ddp"].get("val_curve")
            else "95% of the best method's improvement")
    for r in results.values():
        r["time_to_target_s"] = time_to_target(
            [{"val_loss": v, "wall_s": w} for w, v in r["val_curve"]], target) \
            if target is not None else None
    png = plot(results, target, out / "loss_vs_wall.png",
               f"{args.nprocs} ranks, {args.link}: validation loss vs wall clock")
    summary = dict(link=args.link, world_size=args.nprocs, ranks_per_node=args.ranks_per_node,
                   model=args.model, steps=args.steps, target_loss=target, target_rule=rule,
                   plot=str(png) if png else None, methods=list(results.values()))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        records = [dict(bench="train", **{k: v for k, v in r.items()
                                          if k not in ("val_curve", "loss_curve", "error")})
                   for r in results.values()]
        Path(args.json).write_text(json.dumps(records, indent=1))
    failed = [m for m, r in results.items() if r["status"] != "ok"]
    if failed:
        print(f"perf.bench.train_bench: failed methods: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
