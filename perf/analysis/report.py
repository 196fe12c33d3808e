"""Turn a perf-suite results folder into report.md (tables) and PNG plots.

Input: ``DIR/records.json`` — the list of every benchmark record of the run, each tagged by
the runner with ``bench`` (module), ``link``, ``ranks_per_node`` and ``world_size`` — plus
``DIR/run.json`` (suite, host, jobs with their status) and, when present,
``DIR/train/*.json`` (training comparisons, perf/bench/train_bench.py) and
``DIR/profile/summary.json`` (perf/infra/profile.py).

Collective tables follow nccl-tests: size, count, type, time(us), algbw, busbw (GB/s), plus
wire bytes per rank from the transport counters. Side-by-side ratio tables compare every
implementation with the baseline of its benchmark (raw mpi4py for dense collectives, dense
for sparse/quantized algorithms) as throughput ratios (baseline time / time).

Regenerate from the JSON alone: ``python -m perf report DIR``.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from commrt.training.metrics import pyplot
from perf.analysis import model as ab

BASELINES = ("mpi4py", "dense", "commrt-dense", "torch")


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_f(c) for c in row) + " |")
    return "\n".join(lines)


def link_label(rec: dict) -> str:
    rpn = rec.get("ranks_per_node")
    return rec.get("link", "shm") + (f" ({rpn}/node)" if rpn else "")


def _impl(rec: dict) -> str:
    return str(rec.get("impl") or rec.get("algo") or rec.get("method") or "?")


def baseline_of(impls: Iterable[str]) -> str | None:
    impls = list(impls)
    for b in BASELINES:
        if b in impls:
            return b
    return None


def collective_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "op" in r and "time_us" in r and "bytes" in r
            and r.get("world_size")]


def _group(records: list[dict], keyfn) -> dict:
    out: dict = defaultdict(list)
    for r in records:
        out[keyfn(r)].append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


def nccl_tables(records: list[dict]) -> str:
    parts = []
    for (bench, op, link, p), recs in _group(
            collective_records(records),
            lambda r: (r.get("bench", "?"), r["op"], link_label(r), int(r["world_size"]))).items():
        parts.append(f"#### {bench}: {op}, {p} ranks, link {link}\n")
        rows = []
        for r in sorted(recs, key=lambda r: (r["bytes"], _impl(r))):
            rows.append([fmt_bytes(r["bytes"]), r.get("count"), r.get("dtype", "float32"), _impl(r),
                         float(r["time_us"]), r.get("algbw_gbps"), r.get("busbw_gbps"),
                         fmt_bytes(r["wire_bytes"]) if r.get("wire_bytes") is not None else None])
        parts.append(table(["size", "count", "type", "impl", "time(us)", "algbw(GB/s)",
                            "busbw(GB/s)", "wire/rank"], rows) + "\n")
    return "\n".join(parts)


def ratio_rows(records: list[dict]) -> list[dict]:
    """Throughput of every implementation relative to its benchmark's baseline, per config."""
    rows = []
    for (bench, op, link, p, nbytes), recs in _group(
            collective_records(records),
            lambda r: (r.get("bench", "?"), r["op"], link_label(r), int(r["world_size"]),
                       int(r["bytes"]))).items():
        by_impl = {_impl(r): r for r in recs}
        base = baseline_of(by_impl)
        if base is None or len(by_impl) < 2:
            continue
        for impl, r in by_impl.items():
            if impl == base:
                continue
            rows.append(dict(bench=bench, op=op, link=link, world_size=p, bytes=nbytes,
                             impl=impl, baseline=base,
                             ratio=float(by_impl[base]["time_us"]) / float(r["time_us"])))
    return rows


def ratio_table(records: list[dict]) -> str:
    rows = ratio_rows(records)
    if not rows:
        return "_no configuration measured with two implementations_\n"
    return table(["bench", "op", "link", "ranks", "size", "impl", "vs", "throughput ratio"],
                 [[r["bench"], r["op"], r["link"], r["world_size"], fmt_bytes(r["bytes"]),
                   r["impl"], r["baseline"], r["ratio"]] for r in rows]) + "\n"


def headline(records: list[dict], world_size: int = 4) -> list[str]:
    """The quick suite's two numbers, at the largest size measured, for `world_size` ranks:
    commrt dense / raw MPI throughput (allreduce) and SparDL speedup over dense at 1 Gbit/s."""
    lines = []
    rows = [r for r in ratio_rows(records) if r["world_size"] == world_size]
    dense = [r for r in rows if r["impl"] in ("commrt", "commrt-dense")
             and r["baseline"] == "mpi4py" and "allreduce" in r["op"]]
    for link in sorted({r["link"] for r in dense}):
        best = max((r for r in dense if r["link"] == link), key=lambda r: r["bytes"])
        lines.append(f"commrt dense / raw MPI allreduce throughput, {world_size} ranks, {link}, "
                     f"{fmt_bytes(best['bytes'])}: **{best['ratio']:.2f}x**")
    spar = [r for r in rows if r["impl"].lower().startswith("spardl")
            and not r["impl"].lower().startswith("spardl2") and r["link"].startswith("1gbit")]
    for link in sorted({r["link"] for r in spar}):
        mine = [r for r in spar if r["link"] == link]
        # One team, density 1% when measured (the quick suite's setting), largest gradient.
        preferred = [r for r in mine if r["impl"].endswith("rho=0.01")] or mine
        best = max(preferred, key=lambda r: r["bytes"])
        lines.append(f"SparDL ({best['impl']}) speedup over {best['baseline']} allreduce, "
                     f"{world_size} ranks, {link}, {fmt_bytes(best['bytes'])} gradient: "
                     f"**{best['ratio']:.2f}x**")
    return lines


BANDWIDTH_BOUND_BYTES = 64 * 1024


def model_section(records: list[dict], holdout_links: list[str] = ()) -> tuple[str, list[dict]]:
    """Fitted α–β models, held-back checks and predictions for unmeasured configurations."""
    fits = ab.fit_all(collective_records(records), holdout_links=list(holdout_links))
    if not fits:
        return "_not enough measurements (three points of one op) to fit a model_\n", []
    rows, checks, preds = [], [], []
    for key, entry in fits.items():
        bench, op, impl, link, rpn = key
        m: ab.AlphaBeta = entry["model"]
        label = link + (f" ({rpn}/node)" if rpn else "")
        rows.append([bench, op, impl, label, m.n_points, m.describe(), m.fit_rel_err])
        for h in entry["checks"]:
            checks.append(dict(bench=bench, op=op, impl=impl, fit_link=label, **h))
        biggest = max(r["bytes"] for r in collective_records(records) if ab.group_key(r) == key)
        targets = [(p, link) for p in (8, 16, 64)]
        if ab.link_rate_bps(link) is not None:
            targets += [(4, other) for other in ("100mbit", "10gbit") if other != link]
        for p, tlink in targets:
            t = m.predict_us(op, p, biggest, link=tlink if tlink != link else None)
            preds.append([bench, op, impl, tlink + (f" ({rpn}/node)" if rpn else ""), p,
                          fmt_bytes(biggest), t / 1e3])
    text = ["Model: t = c + α·m(P) + β_rank·w + β_link·P·w (perf/analysis/model.py): "
            "m messages per rank, w wire bytes per rank, P·w bytes on a shared link; fitted per "
            "benchmark/op/implementation/link by relative-error least squares with non-negative "
            "terms. 1/β is the effective bandwidth of a term.\n",
            table(["bench", "op", "impl", "link", "points", "coefficients", "median fit err"],
                  rows),
            ""]
    if checks:
        summary = []
        for kind in sorted({c["check"] for c in checks}):
            cs = [c for c in checks if c["check"] == kind]
            big = [c for c in cs if c["bytes"] >= BANDWIDTH_BOUND_BYTES]
            errs = sorted(c["rel_err"] for c in cs)
            summary.append([kind, f"{sum(c['rel_err'] <= 0.25 for c in big)}/{len(big)}",
                            f"{sum(c['rel_err'] <= 0.25 for c in cs)}/{len(cs)}",
                            f"{errs[len(errs) // 2] * 100:.1f}%"])
        text.append("**Held-back checks**: *interpolate* refits without the middle world size "
                    "and predicts it, *extrapolate* refits without the largest world size, "
                    "*link A->B* predicts measurements on rate B (never fitted) from the fit on A "
                    f"by swapping the wire term. Sizes >= {fmt_bytes(BANDWIDTH_BOUND_BYTES)} are "
                    "bandwidth-bound; below, an oversubscribed 2-core machine adds millisecond "
                    "scheduling noise.\n")
        text.append(table(["check", f"within 25% (>= {fmt_bytes(BANDWIDTH_BOUND_BYTES)})",
                           "within 25% (all sizes)", "median error"], summary) + "\n")
        text.append("<details><summary>every held-back prediction</summary>\n")
        text.append(table(["check", "bench", "op", "impl", "fit link", "ranks", "size",
                           "measured(us)", "predicted(us)", "error"],
                          [[c["check"], c["bench"], c["op"], c["impl"], c["fit_link"],
                            c["world_size"], fmt_bytes(c["bytes"]), float(c["measured_us"]),
                            float(c["predicted_us"]), f"{c['rel_err'] * 100:.1f}%"]
                           for c in checks]) + "\n")
        text.append("</details>\n")
    if preds:
        text.append("Predictions for configurations not measured (largest size measured):\n")
        text.append(table(["bench", "op", "impl", "link", "ranks", "size", "predicted(ms)"], preds)
                    + "\n")
    return "\n".join(text), checks


def _plot_collectives(records: list[dict], plot_dir: Path) -> list[Path]:
    """One figure per (bench, op, link): busbw against size, a line per implementation and
    world size."""
    plt = pyplot()

    paths = []
    for (bench, op, link), recs in _group(
            collective_records(records),
            lambda r: (r.get("bench", "?"), r["op"], link_label(r))).items():
        lines = _group(recs, lambda r: (_impl(r), int(r["world_size"])))
        if all(len(v) < 2 for v in lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (impl, p), rs in lines.items():
            rs = sorted(rs, key=lambda r: r["bytes"])
            ys = [r.get("busbw_gbps") or r["bytes"] / r["time_us"] / 1e3 for r in rs]
            ax.plot([r["bytes"] for r in rs], ys, marker="o", ms=3, label=f"{impl} P={p}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{bench} {op}, link {link}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        safe = "".join(c if c.isalnum() else "_" for c in f"{bench}_{op}_{link}")
        path = plot_dir / f"{safe}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_model(checks: list[dict], plot_dir: Path) -> Path | None:
    if not checks:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 5))
    xs = [c["measured_us"] for c in checks]
    ys = [c["predicted_us"] for c in checks]
    for kind in sorted({c["check"] for c in checks}):
        cs = [c for c in checks if c["check"] == kind]
        ax.scatter([c["measured_us"] for c in cs], [c["predicted_us"] for c in cs], s=14,
                   label=kind)
    ax.legend(fontsize=7)
    lo, hi = min(xs + ys), max(xs + ys)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot([lo, hi], [lo * 1.25, hi * 1.25], "k:", lw=0.6)
    ax.plot([lo, hi], [lo / 1.25, hi / 1.25], "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (us)")
    ax.set_ylabel("predicted by α–β model (us)")
    ax.set_title("held-back configurations: prediction vs measurement", fontsize=9)
    path = plot_dir / "model_heldback.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _load(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_report(out_dir: str | Path) -> Path:
    """Write out_dir/report.md and out_dir/plots/*.png from the JSON in out_dir."""
    out_dir = Path(out_dir)
    records = _load(out_dir / "records.json", [])
    run = _load(out_dir / "run.json", {})
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    md = [f"# commrt perf report: suite `{run.get('suite', '?')}`\n",
          f"- host: {run.get('host', '?')} ({run.get('machine', '')})",
          f"- started {run.get('started', '?')}, wall time {_f(run.get('wall_s'))} s",
          f"- command: `{run.get('command', '')}`",
          f"- links: {', '.join(run.get('links', []))}"
          + (f"; skipped: {run['links_skipped']}" if run.get("links_skipped") else ""),
          ""]
    heads = headline(records, 4 if 4 in run.get("nprocs", [4]) else max(run.get("nprocs", [4])))
    if heads:
        md += ["## Headline", ""] + [f"- {h}" for h in heads] + [""]
    jobs = run.get("jobs", [])
    if jobs:
        loads = [j[k] for j in jobs for k in ("load_before", "load_after") if j.get(k) is not None]
        cores = run.get("cores") or 0
        # The 1-minute load average also counts the suite's own ranks (and lags a job
        # behind), so only load beyond cores + the largest job's ranks is someone else's.
        own = max((int(j.get("nprocs") or 1) for j in jobs), default=1)
        if loads and cores and max(loads) > cores + own:
            md += [f"> **Warning:** the machine was shared: load average up to {max(loads):.1f} on "
                   f"{cores} cores during the run (median {sorted(loads)[len(loads) // 2]:.1f}), "
                   f"more than the suite's own {own} ranks explain. "
                   "Link-bound times (large messages on shaped links) hold; small-message and "
                   "shared-memory times include scheduling delays of other processes.", ""]
        elif cores and own > cores:
            md += [f"> Note: up to {own} ranks ran on {cores} cores, so ranks shared cores: "
                   "compute and small-message times include waiting for a core; link-bound "
                   "times hold.", ""]
        md += ["## Jobs", "", table(
            ["job", "ranks", "link", "status", "wall(s)", "records", "load avg before/after"],
            [[j["name"], j.get("nprocs"), j.get("link"), j.get("status"), j.get("wall_s"),
              j.get("records"), f"{j.get('load_before', '–')} / {j.get('load_after', '–')}"]
             for j in jobs]), ""]
        failed = [j for j in jobs if j.get("status") not in ("ok", "skipped")]
        for j in failed:
            md += [f"<details><summary>{j['name']} ({j.get('status')})</summary>\n",
                   "```", (j.get("error") or "")[-3000:], "```", "</details>", ""]
    coll = collective_records(records)
    if coll:
        md += ["## Side by side (throughput ratio vs baseline, >1 is faster)", "",
               ratio_table(records), "## Collective sweeps (nccl-tests form)", "",
               nccl_tables(records)]
        text, checks = model_section(records, run.get("holdout_links", []))
        md += ["## α–β model", "", text]
        plots = _plot_collectives(records, plot_dir)
        mp = _plot_model(checks, plot_dir)
        if mp:
            plots.append(mp)
        if plots:
            md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    # Training records are shown by their own section below.
    other = [r for r in records if r not in coll and r.get("bench") != "train"]
    if other:
        md += ["## Other records", ""]
        for bench, recs in _group(other, lambda r: (r.get("bench", "?"),)).items():
            keys = [k for k in recs[0] if k not in ("bench",)]
            for r in recs[1:]:
                keys += [k for k in r if k not in keys and k != "bench"]
            md += [f"### {bench[0]}", "", table(keys, [[r.get(k) for k in keys] for r in recs]), ""]
    for name, title in (
            ("sparse", "Sparse and quantized allreduce (perf/bench/sparse.py)"),
            ("overlap", "Overlap of communication with compute (perf/bench/overlap.py)")):
        sub_md = out_dir / name / f"{name}.md"
        if sub_md.exists():
            body = [ln for ln in sub_md.read_text().splitlines() if not ln.startswith("# ")]
            md += [f"## {title}", "", *body, ""]
            if (out_dir / name / f"{name}.png").exists():
                md += [f"![{name}]({name}/{name}.png)", ""]
    methods_md = out_dir / "methods" / "table.md"
    if methods_md.exists():
        body = [ln for ln in methods_md.read_text().splitlines() if not ln.startswith("# ")]
        md += ["## Hybrid methods vs DDP on two-tier nodes (perf/bench/methods.py)", "", *body, ""]
        if (out_dir / "methods" / "loss_vs_wall.png").exists():
            md += ["![methods loss vs wall clock](methods/loss_vs_wall.png)", ""]
    train = _load(out_dir / "train" / "summary.json", None)
    if train:
        from perf.bench.train_bench import report_section
        md += ["## Training comparison", "", report_section(train, out_dir), ""]
    prof = _load(out_dir / "profile" / "summary.json", None)
    if prof:
        from perf.infra.profile import report_section as profile_section
        md += ["## Profiles", "", profile_section(prof), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
