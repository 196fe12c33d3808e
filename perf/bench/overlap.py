"""Overlap benchmark: exposed communication of DDP, ZeRO-1, DPU, ACCO, CDP-v1 and CDP-v2,
and CDP's activation memory with staggered workers.

    python -m perf.bench.overlap [--nprocs 4 8] [--links shm 1gbit] [--steps 12] [--out DIR]

One ``mpirun`` job per (link, world size) over perf/infra/netem.py (``shm``: plain shared memory;
``1gbit``: a namespace whose loopback is shaped to 1 Gbit/s, MPICH on TCP). Every job
trains the GPT of commrt.model (preset and size flags below) on the default corpus with
each method in turn, from the same seed, for the same global number of micro-batches
(``--steps`` × 2 per rank: ZeRO-1, DPU and DDP take 2 micro-batches per step, ACCO at
least 1 per phase and 2 phases per step, CDP 2 staggered workers per step), and reports per
method (means over ranks, after ``--warmup`` steps):

- ``step_s``: wall time per optimizer step;
- ``exposed_s`` (waited): time per step the compute thread spent blocked on
  communication, measured in-process (ACCO/ZeRO-1/DPU: waiting for the round, the whole
  round for ZeRO-1; DDP: the allreduce; CDP: ring polls and drains). ``hidden`` =
  1 − exposed/exposed of the synchronous counterpart (ACCO and DPU vs ZeRO-1, CDP vs
  DDP): the fraction of the baseline's exposed communication hidden;
- ``compute_s``: time inside forward/backward (in-process); with ``--twin`` also the step
  time of the same method on a one-rank communicator. (The twin is not the same work for
  the sharded methods: alone, a rank runs AdamW on the whole model instead of 1/P of it,
  which is why the waited time is the reported measure.)
- ``overlap``: the method's own measure (ACCO/DPU: 1 − waited/comm-thread busy time; CDP:
  share of ring bytes already arrived when needed), ``peak_inflight_B``, ``wire_B`` per step;
- ``val_loss`` after the run (equal tokens for every method) on fixed validation batches.

Plus CDP's peak activation bytes (saved-for-backward tensors) with 4 workers per device,
staggered versus in lockstep. Writes ``DIR/overlap.md`` (tables), ``DIR/overlap.json`` and
``DIR/overlap.png``. ``--worker`` is the per-rank entry point mpirun starts.

DDP here is a flat-gradient all-reduce (one bucket, MPI's allreduce) plus torch AdamW: the
same bytes as torch DDP without its bucketing, so that no torch.distributed backend is
needed inside the job.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from commrt.optim.base import TrainingMethod
from commrt.training.metrics import pyplot
from perf.infra.launch import RESULTS_DIR
from perf.infra.workers import add_driver_arguments, dispatch, run_worker_job, write_json

MODULE = "perf.bench.overlap"

METHODS = ("ddp", "zero1", "dpu", "acco", "cdp-v1", "cdp-v2")
BASELINE = {"dpu": "zero1", "acco": "zero1", "cdp-v1": "ddp", "cdp-v2": "ddp"}


# --------------------------------------------------------------------------------------
# per-rank worker


class _FlatAllreduceDP(TrainingMethod):
    """DDP stand-in: micro_batches × (forward, backward), one allreduce of the flat
    gradient, torch AdamW. Wire bytes per step: 2(P−1)/P · 4n."""

    def __init__(self, model, comm, lr, betas, weight_decay, micro_batches=2):
        import torch

        from commrt.optim.data_parallel import adamw_param_groups

        self.model, self.comm, self.micro_batches = model, comm, micro_batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr,
                                           betas=betas)
        self._stats = dict(step_s=0.0, compute_s=0.0, wait_s=0.0)

    def step(self, next_batch, loss_fn):
        from commrt.transports import flatten, unflatten_into

        t0 = time.perf_counter()
        losses = []
        for _ in range(self.micro_batches):
            x, y = next_batch()
            loss = loss_fn(self.model(x), y) / self.micro_batches
            loss.backward()
            losses.append(float(loss) * self.micro_batches)
        t1 = time.perf_counter()
        flat = flatten([p.grad for p in self.params])
        self.comm.iallreduce(flat, kind="ddp_all_reduce").wait()
        flat /= self.comm.size
        unflatten_into(flat, [p.grad for p in self.params])
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stats["compute_s"] += t1 - t0
        self._stats["wait_s"] += t2 - t1
        self._stats["step_s"] += time.perf_counter() - t0
        return sum(losses) / len(losses)

    def stats(self, reset=False):
        s = dict(self._stats, overlap_fraction=0.0, peak_in_flight_bytes=0)
        if reset:
            self._stats = {k: 0.0 for k in self._stats}
        return s

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _build(name: str, model, comm, args, acco_fixed: int | None = None, **changes):
    """Method `name` of this benchmark over `comm`: DDP is the flat stand-in above, the
    others come from commrt.optim.registry (``cdp-v1`` is its ``cdp`` with rule v1) with
    the benchmark's settings, plus `changes` to MethodOptions."""
    from commrt.optim.registry import MethodOptions, build_method

    if name == "ddp":
        return _FlatAllreduceDP(model, comm, args.lr, (0.9, 0.95), 0.1)
    method, _, rule = name.partition("-")
    options = MethodOptions(lr=args.lr, beta1=0.9, beta2=0.95, weight_decay=0.1,
                            micro_batches=2, max_micro_batches=args.acco_max_micro_batches,
                            stages=args.stages, rule=rule or "v1", workers_per_device=2)
    if name == "acco":
        # adaptive; the compute-only twin does the same work per phase, synchronously
        options = replace(options, micro_batches=acco_fixed, sync_comm=acco_fixed is not None)
    return build_method(method, model, replace(options, **changes), comm)


def worker(args) -> None:
    import torch

    from commrt import transports as T
    from commrt.data import BatchSampler, load_dataset
    from commrt.model import build_gpt, lm_loss, preset

    torch.set_num_threads(1)
    comm = T.world()
    P, r = comm.size, comm.rank
    config = preset(args.preset, n_layer=args.n_layer, n_embd=args.n_embd,
                    block_size=args.block_size)
    data = load_dataset(None, corpus_bytes=2_000_000)
    val = BatchSampler(data.val, args.batch_size, config.block_size, seed=99)
    val_batches = [val.batch(i) for i in range(4)]
    results: dict[str, Any] = {}
    budget = args.steps * 2 * P   # global micro-batches every method consumes
    for name in args.methods:
        model = build_gpt(config, seed=0)
        method = _build(name, model, comm, args)
        sampler = BatchSampler(data.shard(r, P), args.batch_size, config.block_size,
                               seed=1, stream=r)
        wire0 = T.wire.total_bytes()
        consumed, steps, timed_steps = 0, 0, 0
        while consumed < budget:
            if steps == args.warmup:
                method.stats(reset=True)
                wire0 = T.wire.total_bytes()
            method.step(sampler, lm_loss)
            steps += 1
            consumed = sum(comm.allgather_object(sampler.position))
            timed_steps = steps - args.warmup
        s = method.stats()
        method.close()
        with torch.no_grad():
            val_loss = sum(float(lm_loss(model(x), y)) for x, y in val_batches) / len(val_batches)
        n = max(timed_steps, 1)
        compute_only = (_compute_only_step_s(name, config, args, data, comm, s, lm_loss)
                        if args.twin else 0.0)
        waited = s["exposed_comm_s"] if name.startswith("cdp") else s["wait_s"]
        row = dict(step_s=s["step_s"] / n, compute_s=s["compute_s"] / n,
                   compute_only_s=compute_only, waited_s=waited / n,
                   overlap=s.get("overlap_fraction", 0.0),
                   peak_inflight_B=s.get("peak_in_flight_bytes", 0),
                   wire_B=(T.wire.total_bytes() - wire0) / n, steps=steps,
                   micro_batches_per_step=sampler.position / steps, val_loss=val_loss)
        gathered = comm.allgather_object(row)
        if r == 0:
            mean = {k: sum(g[k] for g in gathered) / P for k in row}
            mean["exposed_s"] = mean["waited_s"]
            mean["step_minus_twin_s"] = (max(0.0, mean["step_s"] - mean["compute_only_s"])
                                         if args.twin else None)
            results[name] = mean
            print(f"[overlap] {name}: {json.dumps(mean)}", file=sys.stderr, flush=True)
        comm.barrier()

    # CDP activation memory: 4 workers per device, staggered vs lockstep
    memory = {}
    if args.memory:
        for stagger in (True, False):
            model = build_gpt(config, seed=0)
            method = _build("cdp-v1", model, comm, args, workers_per_device=4, stagger=stagger)
            sampler = BatchSampler(data.shard(r, P), args.batch_size, config.block_size,
                                   seed=1, stream=r)
            for _ in range(2):
                method.step(sampler, lm_loss)
            memory["staggered" if stagger else "lockstep"] = method.stats()[
                "peak_activation_bytes"]
    if r == 0:
        write_json(args.json, {"nprocs": P, "methods": results, "activation_bytes": memory})


def _compute_only_step_s(name, config, args, data, comm, real_stats, loss_fn) -> float:
    """Step time of the same method and work on a one-rank communicator (every rank at
    once, so the machine is as loaded as in the real run): no communication at all."""
    from commrt.data import BatchSampler
    from commrt.model import build_gpt

    solo = comm.split(comm.rank, 0)
    fixed = None
    if name == "acco":
        fixed = max(1, round(real_stats["micro_batches_per_round"]))
    model = build_gpt(config, seed=0)
    method = _build(name, model, solo, args, acco_fixed=fixed)
    sampler = BatchSampler(data.shard(comm.rank, comm.size), args.batch_size,
                           config.block_size, seed=1, stream=comm.rank)
    method.step(sampler, loss_fn)   # warm-up
    comm.barrier()
    repeats = 3
    t0 = time.perf_counter()
    for _ in range(repeats):
        method.step(sampler, loss_fn)
    elapsed = (time.perf_counter() - t0) / repeats
    if fixed is not None:  # per micro-batch: the real run's phases average a fraction
        elapsed *= 2 * real_stats["micro_batches_per_round"] / (2 * fixed)
    method.close()
    comm.barrier()
    return elapsed


# --------------------------------------------------------------------------------------
# driver


def _table(run: dict) -> str:
    res = run["methods"]
    lines = [f"### {run['nprocs']} ranks, link {run['link']}", "",
             "| method | step ms | exposed (waited) ms | hidden vs baseline | own overlap "
             "| fwd/bwd ms | compute-only twin ms | micro-batches/step | wire KB/step "
             "| peak in-flight KB | val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res.items():
        base = res.get(BASELINE.get(name, ""))
        hidden = ("" if base is None or base["exposed_s"] <= 0 else
                  f"{100 * (1 - m['exposed_s'] / base['exposed_s']):.0f}%")
        lines.append(
            f"| {name} | {1e3 * m['step_s']:.1f} | {1e3 * m['exposed_s']:.1f} | {hidden} | "
            f"{100 * m['overlap']:.0f}% | {1e3 * m['compute_s']:.1f} | "
            f"{1e3 * m['compute_only_s']:.1f} | "
            f"{m['micro_batches_per_step']:.2f} | {m['wire_B'] / 1e3:.1f} | "
            f"{m['peak_inflight_B'] / 1e3:.1f} | {m['val_loss']:.4f} |")
    mem = run.get("activation_bytes") or {}
    if mem.get("lockstep"):
        lines += ["", f"CDP, 4 workers per device: peak activation "
                      f"{mem['staggered'] / 1e6:.2f} MB staggered vs "
                      f"{mem['lockstep'] / 1e6:.2f} MB lockstep "
                      f"(ratio {mem['staggered'] / mem['lockstep']:.2f})"]
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    plt = pyplot(required=False)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        names = list(run["methods"])
        comp = [1e3 * (run["methods"][n]["step_s"] - run["methods"][n]["exposed_s"])
                for n in names]
        exp = [1e3 * run["methods"][n]["exposed_s"] for n in names]
        ax.bar(names, comp, label="rest of the step")
        ax.bar(names, exp, bottom=comp, label="exposed comm")
        ax.set_title(f"{run['nprocs']} ranks, {run['link']}")
        ax.set_ylabel("ms per optimizer step")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--links", nargs="+", default=["shm", "1gbit"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=12, help="micro-batch budget / (2 per rank)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--acco-max-micro-batches", type=int, default=8,
                   help="cap on the micro-batches ACCO accumulates per phase")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--twin", action="store_true",
                   help="also time each method on a one-rank communicator (compute-only twin)")
    add_driver_arguments(p, timeout=900, out=str(RESULTS_DIR / "overlap"),
                         out_help="folder of overlap.md, overlap.json and overlap.png")
    args = p.parse_args(argv)
    return dispatch(args, worker, run_driver)


def run_driver(args: argparse.Namespace) -> int:
    """One job per (link, world size); the tables, JSON and plot of those that ran. Exit
    status 1 when a job failed."""
    from perf.infra.launch import launch_mpi
    from perf.infra.netem import LinkUnavailable

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passthrough = ["--methods", *args.methods, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--preset", args.preset,
                   "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
                   "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
                   "--stages", str(args.stages), "--lr", str(args.lr),
                   "--acco-max-micro-batches", str(args.acco_max_micro_batches)]
    if not args.memory:
        passthrough.append("--no-memory")
    if args.twin:
        passthrough.append("--twin")
    runs: list[dict] = []
    failures: list[str] = []
    for link in args.links:
        for nprocs in args.nprocs:
            t0 = time.time()
            try:
                run = run_worker_job(
                    lambda worker_args, link=link, nprocs=nprocs: launch_mpi(
                        nprocs, MODULE, worker_args, link=link, timeout=args.timeout,
                        check=False),
                    passthrough, f"{link} x{nprocs}", failures)
            except LinkUnavailable as exc:
                print(f"skip {link}: {exc}", file=sys.stderr)
                continue
            if run is None:
                continue
            run["link"] = link
            run["wall_s"] = time.time() - t0
            runs.append(run)
            print(_table(run) + "\n", flush=True)
            write_json(out / "overlap.json", runs)
    load = os.getloadavg()[0]
    header = ["# Overlap benchmark (perf/bench/overlap.py)", "",
              f"Machine: {socket.gethostname()}, {os.cpu_count()} cores, load average "
              f"{load:.1f} at the end (ranks share cores when they outnumber them); GPT "
              f"preset {args.preset} (n_layer {args.n_layer}, n_embd {args.n_embd}, "
              f"block {args.block_size}), batch {args.batch_size} sequences per micro-batch, "
              f"{args.steps}×2 micro-batches per rank per method. Times are per optimizer "
              "step, means over ranks. See the module docstring for the definitions.", ""]
    (out / "overlap.md").write_text("\n".join(header + [_table(r) + "\n" for r in runs]))
    _plot(runs, out / "overlap.png")
    write_json(args.json, runs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
