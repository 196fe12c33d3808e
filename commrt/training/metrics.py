"""What ``python -m commrt.train`` measures and shows: records, progress, summary, plot.

The numbers (also in commrt/train.py's docstring): ``loss`` is the mean over ranks of the
training loss of the steps since the previous record; ``wire_bytes`` the bytes this rank put
on the wire since then, from the transport's counters, summed over ranks and divided by the
world size; ``comm_s`` the exposed communication time, the step time minus the compute-only
step time (docs/design.md §6), the latter measured once before training by
`measure_compute`. `Meter` keeps this rank's accounting, `MetricsLog` the records
(rank 0 appends them to ``metrics.jsonl``), `Progress` rank 0's live line, `write_summary`
``summary.json`` and the final line, `write_plot` ``loss.png``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commrt import transports as T

from .checkpoint import atomic_write_bytes


def measure_compute(model, batch, loss_fn, repeats: int = 3) -> tuple[float, float]:
    """(seconds per micro-batch forward+backward, seconds per AdamW step) on a copy."""
    import torch

    probe = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-9)
    inputs, targets = batch
    fb, opt = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss_fn(probe(inputs), targets).backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:  # the first round warms up allocators
            fb.append(t1 - t0)
            opt.append(t2 - t1)
    return sorted(fb)[len(fb) // 2], sorted(opt)[len(opt) // 2]


def evaluate_loss(model, sampler, iters: int, loss_fn) -> float:
    """This rank's mean loss of `model` on batches 0..iters-1 of `sampler` (the same batches
    at every evaluation), without gradients."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(iters):
            inputs, targets = sampler.batch(i)
            total += float(loss_fn(model(inputs), targets))
    model.train(was_training)
    return total / iters


def _fresh_pending() -> dict[str, Any]:
    return {"loss_sum": 0.0, "steps": 0, "tokens": 0, "wire": 0, "comm_s": 0.0, "wall_s": 0.0}


class Meter:
    """This rank's accounting: `pending` sums the steps since the last record, `totals` the
    job's running sums of the all-reduced records (the same on every rank). Both are
    checkpointed as they are. `start` before the first step; time outside steps
    (evaluation, logging, checkpoints) is not training time: `restart_clock` after it."""

    def __init__(self, world_size: int, tokens_per_batch: int, compute: tuple[float, float]):
        self.world_size = world_size
        self.tokens_per_batch = tokens_per_batch
        self.fb_s, self.opt_s = compute
        self.totals = {"tokens": 0, "wall_s": 0.0, "wire_bytes": 0.0, "comm_s": 0.0,
                       "micro_batches": 0}
        self.pending = _fresh_pending()
        self.wire_before = 0
        self.t_last = 0.0

    def start(self) -> None:
        """Steps start now: what the transport counted so far is not theirs."""
        self.wire_before = T.wire.total_bytes()
        self.t_last = time.perf_counter()

    def restart_clock(self) -> None:
        self.t_last = time.perf_counter()

    def step(self, loss: float, micro_batches: int, t0: float, t1: float) -> None:
        """Account one step that consumed `micro_batches` and ran from `t0` to `t1`."""
        exposed = max(0.0, (t1 - t0) - micro_batches * self.fb_s - self.opt_s)
        wire_now = T.wire.total_bytes()
        p = self.pending
        p["loss_sum"] += loss
        p["steps"] += 1
        p["tokens"] += micro_batches * self.tokens_per_batch
        p["wire"] += wire_now - self.wire_before
        p["comm_s"] += exposed
        p["wall_s"] += t1 - self.t_last
        self.t_last = t1
        self.wire_before = wire_now

    def live(self) -> tuple[float, float, float]:
        """(tokens/s of the job, wire MB per step, exposed comm ms per step) since the last
        record, from this rank's counts."""
        p = self.pending
        return (p["tokens"] * self.world_size / max(p["wall_s"], 1e-9),
                p["wire"] / p["steps"] / 1e6, 1e3 * p["comm_s"] / p["steps"])

    def record(self, step: int, mean: Callable[[list[float]], list[float]]
               ) -> tuple[dict[str, Any], float]:
        """The record of the steps since the last one (collective: `mean` averages over
        ranks) and its exposed comm ms per step; starts the next window."""
        p, t = self.pending, self.totals
        loss_mean, tokens, wire_bytes, comm_s, wall_s = mean(
            [p["loss_sum"] / p["steps"], p["tokens"], p["wire"], p["comm_s"], p["wall_s"]])
        tokens *= self.world_size
        t["tokens"] += int(round(tokens))
        t["wall_s"] += wall_s
        t["wire_bytes"] += wire_bytes
        t["comm_s"] += comm_s
        record = {"step": step, "loss": loss_mean, "val_loss": None,
                  "tokens": t["tokens"], "wall_s": t["wall_s"],
                  "wire_bytes": wire_bytes, "wire_bytes_total": t["wire_bytes"],
                  "comm_s": comm_s, "tok_per_s": tokens / max(wall_s, 1e-9),
                  "wire_bytes_per_step": wire_bytes / p["steps"],
                  "step_ms": 1e3 * wall_s / p["steps"]}
        comm_ms = 1e3 * comm_s / p["steps"]
        self.pending = {k: 0 if isinstance(v, int) else 0.0 for k, v in p.items()}
        return record, comm_ms


class MetricsLog:
    """The records of a run; rank 0 appends each to OUT/metrics.jsonl as it comes."""

    def __init__(self, out: Path, rank: int):
        self.path = out / "metrics.jsonl"
        self.rank = rank
        self.records: list[dict[str, Any]] = []

    def resume(self, step: int) -> None:
        """Continue an interrupted run: keep (in memory and in the file) its records up to
        `step`, dropping those written after its last checkpoint."""
        if self.rank == 0 and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            self.records = [r for r in records if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def output_is_terminal() -> bool:
    """Whether what rank 0 prints ends up on a terminal. Under mpirun a rank's stdout is a
    pipe to the launcher, which copies it to its own stdout: so look at the launcher's
    (Linux /proc; on failure, assume not). COMMRT_PROGRESS=bar|lines overrides."""
    forced = os.environ.get("COMMRT_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    if sys.stdout.isatty():
        return True
    pid = os.getppid()
    for _ in range(4):   # rank -> hydra proxy -> mpiexec (a few levels at most)
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name.startswith(("mpiexec", "mpirun", "orterun", "prterun", "prte")):
                return os.readlink(f"/proc/{pid}/fd/1").startswith(("/dev/pts/", "/dev/tty"))
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class Progress:
    """Rank 0's live line: a redrawn bar on a terminal, one plain line per record otherwise."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = enabled and output_is_terminal()

    def _line(self, step, loss, tok_s, wire_mb, comm_ms) -> str:
        return (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | "
                f"{tok_s:,.0f} tok/s | wire {wire_mb:.3f} MB/step | comm {comm_ms:.1f} ms/step")

    def step(self, step, loss, tok_s, wire_mb, comm_ms) -> None:
        if self.tty:
            width = 24
            filled = int(width * step / self.total)
            bar = "#" * filled + "-" * (width - filled)
            line = self._line(step, loss, tok_s, wire_mb, comm_ms)
            sys.stdout.write(f"\r[{bar}] {line}\x1b[K")
            sys.stdout.flush()

    def record(self, step, loss, tok_s, wire_mb, comm_ms) -> None:
        if self.enabled and not self.tty:
            print(self._line(step, loss, tok_s, wire_mb, comm_ms), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\r\x1b[K" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def pyplot(required: bool = True) -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed). Without
    matplotlib (the `plot` extra): ModuleNotFoundError, or None when not `required`."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        if required:
            raise
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plot(records: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, (ax_time, ax_wire) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    for ax, key, label in ((ax_time, "wall_s", "wall-clock (s)"),
                           (ax_wire, "wire_bytes_total", "wire bytes per rank (MB)")):
        scale = 1e-6 if key == "wire_bytes_total" else 1.0
        ax.plot([r[key] * scale for r in train], [r["loss"] for r in train], label="train")
        ax.plot([r[key] * scale for r in val], [r["val_loss"] for r in val], "o-",
                label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(summary: dict[str, Any], records: list[dict], out: Path, plot_title: str | None,
                  progress: Progress) -> None:
    """Rank 0: OUT/summary.json, OUT/loss.png (with a `plot_title`) and the final line."""
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if plot_title is not None:
        write_plot(records, out / "loss.png", plot_title)
    progress.message(
        f"done: {summary['steps']} steps in {summary['wall_s']:.1f}s | val loss "
        f"{summary['start_val_loss']:.4f} -> {summary['final_val_loss']:.4f} | "
        f"{summary['wire_bytes_per_step'] / 1e6:.3f} MB/step/rank on the wire | exposed comm "
        f"{summary['comm_s']:.1f}s | {out}")
