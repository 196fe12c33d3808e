"""Per-rank py-spy profiles of perf-suite jobs: flame graphs and where the time goes.

``python -m perf run SUITE --profile`` starts every rank of every MPI job under
``py-spy record`` (through :func:`wrap_command`; each rank's file is named by the rank its
launcher announced, ``commrt.transports.rendezvous.launcher_rank``), sampling native frames
too (``--native``) so that time inside libmpi, libtorch or a Triton kernel is visible, and
idle threads (``--idle``) so that a rank blocked on the network is counted. After the run,
:func:`summarize` writes for each rank a flame graph ``rank<R>.svg`` and adds the rank's
samples by category to ``summary.json``:

* **compute** — stacks inside libtorch / BLAS / OpenMP outside the kernels below;
* **packing kernels** — anything under commrt.kernels (top-k, pack/unpack, quantize) or Triton;
* **transport wait** — stacks inside MPI (libmpi, libfabric/UCX, mpi4py), commrt.transports or gloo;
* **python overhead** — the rest: interpreter, bookkeeping, garbage collection;
* **startup (imports)** — module imports, reported apart and left out of the shares, since
  a short benchmark is otherwise mostly ``import torch``.

The first matching rule wins, in the order packing, transport, compute (a top-k called from
a collective is packing, an MPI wait inside a kernel module would still be transport only
if no kernel frame is above it). Environment: ``COMMRT_PROFILE_RATE`` (samples/s, default
50), ``COMMRT_PROFILE_NATIVE=0`` to sample Python frames only (cheaper; then MPI and torch
time shows as the Python line that called them, i.e. as python overhead).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = ("compute", "packing kernels", "transport wait", "python overhead")
STARTUP = "startup (imports)"
ATTACH_TRIES = 20                 # py-spy tries for about 0.5 s each
_COLORS = {"compute": "#e8a33d", "packing kernels": "#c85ad6", "transport wait": "#4a90d9",
           "python overhead": "#8fbf5a", STARTUP: "#bbbbbb"}

_STARTUP_RE = re.compile(r"_find_and_load|<frozen importlib|_bootstrap_external")
_PACKING_RE = re.compile(r"[/(]kernels/|commrt/kernels|commrt\.kernels|triton|libtriton")
_TRANSPORT_RE = re.compile(r"libmpi|libfabric|libucp|libucs|libuct|mpi4py|MPI\.|[/(]transports/"
                           r"|commrt/transports|gloo|libpmi|MPIR_|MPID|PMPI_")
_COMPUTE_RE = re.compile(r"libtorch|libc10|libmkl|libopenblas|libgomp|libiomp|libcublas|libcudnn"
                         r"|libcuda|aten|at::")


def classify(frames: list[str]) -> str:
    """Category of one sampled stack (root first), by the rules in the module docstring."""
    joined = ";".join(frames)
    if _STARTUP_RE.search(joined):
        return STARTUP
    if _PACKING_RE.search(joined):
        return "packing kernels"
    if _TRANSPORT_RE.search(joined):
        return "transport wait"
    if _COMPUTE_RE.search(joined):
        return "compute"
    return "python overhead"


def wrap_command(out_dir: str | Path) -> list[str]:
    """argv prefix that records the rank it starts with py-spy into out_dir/rank<R>.txt."""
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "perf.infra.profile", "record", str(out_dir), "--"]


def _py_spy() -> str:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else (shutil.which("py-spy") or "py-spy")


def record(out_dir: str, command: list[str]) -> int:
    """Run `command`, attach py-spy to it, return the command's exit status.

    The rank's file is named by the launcher's rank (`launcher_rank`). The command starts
    first and py-spy attaches by pid (``py-spy record -- CMD`` would hide the command's exit
    status, and both must keep the launcher's PMI file descriptor open: close_fds=False).
    py-spy gives up attaching after a fraction of a second; on a loaded node the new
    interpreter can take longer to set up its first thread, so a py-spy that fails while the
    command still runs is started again (up to ATTACH_TRIES times). If nothing was recorded,
    py-spy's error is written to stderr.
    """
    # Imported here: it imports torch, which `summarize` and the report need not pay.
    from commrt.transports.rendezvous import launcher_rank

    rank = launcher_rank()
    rate = os.environ.get("COMMRT_PROFILE_RATE", "50")
    out = Path(out_dir) / f"rank{rank}.txt"
    child = subprocess.Popen(command, close_fds=False)
    cmd = [_py_spy(), "record", "--format", "raw", "--rate", rate, "--idle",
           "--pid", str(child.pid), "-o", str(out)]
    if os.environ.get("COMMRT_PROFILE_NATIVE", "1") != "0":
        cmd.append("--native")

    def attach() -> subprocess.Popen:
        # py-spy's banner goes to stderr so that the rank's stdout stays the benchmark's own.
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    spy, tries, status = attach(), 1, None
    while status is None:
        try:
            status = child.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            if spy.poll() not in (None, 0) and tries < ATTACH_TRIES:
                spy.communicate()
                spy, tries = attach(), tries + 1
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not out.exists():
        sys.stderr.write(f"perf.infra.profile: py-spy recorded nothing for rank {rank} "
                         f"({tries} attach attempts):\n" + err.decode(errors="replace")[-2000:])
    return status


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            stacks.append((stack.split(";"), int(count)))
        except ValueError:
            continue
    return stacks


def shares(counts: dict[str, int]) -> dict[str, float]:
    """Fraction of the non-startup samples in each category."""
    total = sum(counts.get(c, 0) for c in CATEGORIES)
    return {c: (counts.get(c, 0) / total if total else 0.0) for c in CATEGORIES}


def flame_svg(stacks: list[tuple[list[str], int]], title: str, width: int = 1200) -> str:
    """A self-contained flame graph (root at the bottom), coloured by category."""
    tree: dict = {"n": 0, "kids": {}, "cat": None}
    for frames, count in stacks:
        cat = classify(frames)
        node = tree
        node["n"] += count
        for f in frames:
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}, "cat": cat})
            node["n"] += count
    total = max(tree["n"], 1)
    row, rects, depth_max = 16, [], [0]
    min_w = 0.5

    def walk(node: dict, name: str, x: float, depth: int) -> None:
        w = node["n"] / total * width
        if w < min_w:
            return
        depth_max[0] = max(depth_max[0], depth)
        if depth > 0:
            label = html.escape(name)
            pct = 100.0 * node["n"] / total
            fits = name if len(name) * 6.5 < w else name[: max(int(w / 6.5) - 2, 0)] + ".."
            text = html.escape(fits) if w > 25 else ""
            rects.append((x, depth, w, _COLORS.get(node["cat"], "#dddddd"),
                          f"{label} ({node['n']} samples, {pct:.1f}%)", text))
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            walk(kid, kid_name, cx, depth + 1)
            cx += kid["n"] / total * width

    walk(tree, "all", 0.0, 0)
    height = (depth_max[0] + 3) * row
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<text x="4" y="13">{html.escape(title)} ({total} samples; colours: '
           + ", ".join(f'{k}={v}' for k, v in _COLORS.items()) + ")</text>"]
    for x, depth, w, color, tip, text in rects:
        y = height - (depth + 1) * row
        out.append(f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" '
                   f'height="{row - 1}" fill="{color}" stroke="white" stroke-width="0.3"/>'
                   + (f'<text x="{x + 2:.1f}" y="{y + 11}">{text}</text>' if text else "") + "</g>")
    out.append("</svg>")
    return "\n".join(out)


def summarize(profile_dir: str | Path) -> dict:
    """Write rank<R>.svg beside every rank<R>.txt under profile_dir/<job>/ and
    profile_dir/summary.json: {job: {"ranks": {rank: counts}, "total": counts, "shares": ...}}."""
    profile_dir = Path(profile_dir)
    summary: dict = {}
    if not profile_dir.exists():
        return summary
    for job_dir in sorted(p for p in profile_dir.iterdir() if p.is_dir()):
        ranks, total = {}, Counter()
        for path in sorted(job_dir.glob("rank*.txt")):
            stacks = read_collapsed(path)
            counts = Counter()
            for frames, n in stacks:
                counts[classify(frames)] += n
            ranks[path.stem] = dict(counts)
            total.update(counts)
            path.with_suffix(".svg").write_text(flame_svg(stacks, f"{job_dir.name} {path.stem}"))
        if ranks:
            summary[job_dir.name] = dict(ranks=ranks, total=dict(total), shares=shares(total),
                                         startup_samples=total.get(STARTUP, 0))
    (profile_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def report_section(summary: dict) -> str:
    """Markdown table of the time shares of each profiled job (all ranks together)."""
    rows = ["| job | samples | " + " | ".join(CATEGORIES) + " | startup samples | flame graphs |",
            "|" + "---|" * (len(CATEGORIES) + 4)]
    for job, entry in summary.items():
        n = sum(entry["total"].get(c, 0) for c in CATEGORIES)
        cells = " | ".join(f"{entry['shares'][c] * 100:.1f}%" for c in CATEGORIES)
        links = " ".join(f"[{r}](profile/{job}/{r}.svg)" for r in entry["ranks"])
        rows.append(f"| {job} | {n} | {cells} | {entry['startup_samples']} | {links} |")
    return ("py-spy samples of every rank (native frames, idle included), by category "
            "(perf/infra/profile.py); shares exclude startup imports.\n\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.infra.profile",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run a command under py-spy (used on every rank)")
    rec.add_argument("out_dir")
    rec.add_argument("cmd", nargs=argparse.REMAINDER)
    summ = sub.add_parser("summarize", help="flame graphs and shares of a profile folder")
    summ.add_argument("profile_dir")
    args = parser.parse_args(argv)
    if args.command == "record":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("record needs a command after --")
        raise SystemExit(record(args.out_dir, cmd))
    print(json.dumps(summarize(args.profile_dir), indent=1))


if __name__ == "__main__":
    main()
