"""α–β performance model of a collective, fitted from perf-suite measurements.

For one (benchmark, op, implementation, link) the time of a call on P ranks moving S bytes is

    t(P, S) = c + α·m(P) + β_rank·w(P, S) + β_link·P·w(P, S)

with m(P) the latency rounds of one call (messages per rank: the record's ``messages``
field, else the formula of ``latency_rounds``), w the wire bytes per rank (the record's
``wire_bytes``, else the volume formula of docs/design.md §5: the bus factor of
perf/infra/units.py times the array's bytes) and P·w the bytes the whole job puts on the
fabric at once (w for point-to-point ops, where one message is in flight). β_rank is the
cost per byte of one rank's link (per-node NIC, memory copies); β_link the cost per byte of
a link every rank shares (the flat shaped loopback of perf/infra/netem.py: all ranks' bytes
cross one tbf). All coefficients are fitted non-negative on *relative* error (times span
five decades), choosing the best subset of terms, so a term the data cannot see is dropped
instead of going negative. The loss is the
absolute relative error (robust to the scheduling outliers of an oversubscribed machine).

A model predicts other world sizes and sizes directly, and other link rates by swapping the
wire part of its byte cost: a shaped rate R contributes 8/R seconds per byte, so
β' = β − 8/R_measured + 8/R_new on whichever term carries the shaped bytes (the host
costs — copies, TCP stack — stay).

``held_back_check`` fits on all but one configuration (a world size) and reports the error of
the prediction for the held-back one: the suite's evidence that the model is usable.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from perf.infra.netem import link_rate_bps
from perf.infra.units import base_op, bus_factor

TERMS = ("c", "alpha", "beta_rank", "beta_link")

def latency_rounds(op: str, world_size: int) -> float:
    """Messages per rank of one call when a record does not say: 1 for point-to-point,
    2⌈log2 P⌉ for allreduce (reduce-scatter + all-gather halves), ⌈log2 P⌉ otherwise."""
    p = max(world_size, 1)
    base = base_op(op)
    if base in ("pingpong", "sendrecv"):
        return 1.0
    logp = math.ceil(math.log2(p)) if p > 1 else 0
    return 2.0 * logp if base == "allreduce" else float(logp)


def features(record: dict) -> np.ndarray:
    """[1, m, w, senders·w] of one record (see module docstring): a collective's P ranks
    all send at once; a ping-pong has one message in flight, whatever the world size."""
    p = int(record["world_size"])
    m = record.get("messages")
    m = float(m) if m is not None else latency_rounds(record["op"], p)
    w = record.get("wire_bytes")
    w = float(w) if w is not None else bus_factor(record["op"], p) * float(record["bytes"])
    senders = 1 if base_op(record["op"]) in ("pingpong", "sendrecv") else p
    return np.array([1.0, m, w, senders * w])


def _nnls_subset(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by trying every subset of columns (at most 4 here)."""
    best, best_res = np.zeros(a.shape[1]), float(np.sum(b ** 2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            res = float(np.sum((a[:, cols] @ sol - b) ** 2))
            if res < best_res - 1e-15:
                full = np.zeros(a.shape[1])
                full[list(cols)] = sol
                best, best_res = full, res
    return best


@dataclass
class AlphaBeta:
    """A fitted model; coefficients in seconds (c, alpha) and seconds per byte (betas)."""

    c: float
    alpha: float
    beta_rank: float
    beta_link: float
    link: str
    n_points: int
    fit_rel_err: float    # median |pred − t| / t over the fitted points
    shared_link: bool = True   # shaped bytes of every rank cross one link (flat emulation)

    def coefficients(self) -> np.ndarray:
        return np.array([self.c, self.alpha, self.beta_rank, self.beta_link])

    def predict_us(self, op: str, world_size: int, nbytes: float, *, link: str | None = None,
                   wire_bytes: float | None = None, messages: float | None = None) -> float:
        """Predicted microseconds per call; `link` another rate than the fitted one."""
        rec = dict(op=op, world_size=world_size, bytes=nbytes, wire_bytes=wire_bytes,
                   messages=messages)
        coef = self.for_link(link).coefficients() if link else self.coefficients()
        return float(features(rec) @ coef) * 1e6

    def for_link(self, link: str) -> AlphaBeta:
        """This model moved to another shaped rate (see module docstring)."""
        old, new = link_rate_bps(self.link), link_rate_bps(link)
        if old is None or new is None:
            if link == self.link:
                return self
            raise ValueError(f"can only move a model between shaped links, not {self.link} "
                             f"-> {link}")
        delta = 8.0 / new - 8.0 / old
        beta_rank, beta_link = self.beta_rank, self.beta_link
        # Flat emulation: all ranks' bytes share the shaped loopback (the P·w term); two-tier
        # with one rank per node: each rank has its own shaped NIC (the w term).
        if self.shared_link:
            beta_link = max(beta_link + delta, 0.0)
        else:
            beta_rank = max(beta_rank + delta, 0.0)
        return AlphaBeta(self.c, self.alpha, beta_rank, beta_link, link, self.n_points,
                         self.fit_rel_err, self.shared_link)

    def describe(self) -> str:
        parts = [f"c={self.c * 1e6:.1f}us", f"alpha={self.alpha * 1e6:.1f}us/msg"]
        if self.beta_rank > 0:
            parts.append(f"1/beta_rank={1e-9 / self.beta_rank:.3g}GB/s")
        if self.beta_link > 0:
            parts.append(f"1/beta_link={1e-9 / self.beta_link:.3g}GB/s")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def fit(records: Sequence[dict], link: str, shared_link: bool = True) -> AlphaBeta:
    """Fit the model to records (fields op, world_size, bytes, time_us; optional wire_bytes,
    messages) of one op/implementation measured on `link` (shared_link: see AlphaBeta)."""
    if len(records) < 2:
        raise ValueError(f"need at least 2 measurements to fit, got {len(records)}")
    a = np.stack([features(r) for r in records])
    t = np.array([float(r["time_us"]) * 1e-6 for r in records])
    if np.any(t <= 0):
        raise ValueError("times must be positive")
    # Least absolute relative error, by iteratively reweighted least squares: a loop that the
    # scheduler of an oversubscribed machine delayed by milliseconds is an outlier, and the
    # squared loss would let a few of them bend every coefficient.
    rows, weights = a / t[:, None], np.ones_like(t)
    for _ in range(30):
        sw = np.sqrt(weights)
        coef = _nnls_subset(rows * sw[:, None], sw)
        resid = np.abs(rows @ coef - 1.0)
        weights = 1.0 / np.maximum(resid, 0.02)
    rel = np.abs(a @ coef - t) / t
    return AlphaBeta(*map(float, coef), link=link, n_points=len(records),
                     fit_rel_err=float(np.median(rel)), shared_link=shared_link)


def _check_rows(model: AlphaBeta, held: Sequence[dict], link: str | None = None) -> list[dict]:
    rows = []
    for r in held:
        pred = model.predict_us(r["op"], int(r["world_size"]), float(r["bytes"]), link=link,
                                wire_bytes=r.get("wire_bytes"), messages=r.get("messages"))
        rows.append(dict(bytes=r["bytes"], world_size=r["world_size"], link=r.get("link", link),
                         measured_us=r["time_us"], predicted_us=pred,
                         rel_err=abs(pred - r["time_us"]) / r["time_us"]))
    return rows


def held_back_check(records: Sequence[dict], link: str, hold_world_size: int,
                    shared_link: bool = True) -> list[dict]:
    """Fit without the `hold_world_size` records, predict them; one row per held-back record
    (bytes, world_size, link, measured_us, predicted_us, rel_err)."""
    train = [r for r in records if int(r["world_size"]) != hold_world_size]
    held = [r for r in records if int(r["world_size"]) == hold_world_size]
    if not held:
        raise ValueError(f"no records at world size {hold_world_size} to hold back")
    if len(train) < 2:
        raise ValueError("need measurements at another world size to fit")
    return _check_rows(fit(train, link, shared_link), held)


def held_back_link_check(records: Sequence[dict], fit_link: str, held_link: str,
                         shared_link: bool = True) -> list[dict]:
    """Fit on `fit_link` records, predict the `held_link` records (another shaped rate)."""
    train = [r for r in records if r.get("link") == fit_link]
    held = [r for r in records if r.get("link") == held_link]
    if len(train) < 2 or not held:
        raise ValueError(f"need records on both {fit_link} and {held_link}")
    return _check_rows(fit(train, fit_link, shared_link), held, link=held_link)


def group_key(record: dict) -> tuple:
    return (record.get("bench", "?"), record["op"], record.get("impl", "?"),
            record.get("link", "shm"), record.get("ranks_per_node"))


def fit_all(records: Iterable[dict], holdout_links: Sequence[str] = ()) -> dict[tuple, dict]:
    """Fit every (bench, op, impl, link, ranks_per_node) group of records.

    Returns {key: {"model": AlphaBeta, "checks": [rows]}}. Checks, when the data allow:
    "interpolate" (refit without the middle world size, predict it), "extrapolate" (refit
    without the largest world size, predict it), and for a group on a shaped link, "link"
    (predict the same op measured on each of `holdout_links`, which are never fitted).
    """
    groups: dict[tuple, list[dict]] = {}
    held_groups: dict[tuple, list[dict]] = {}
    for r in records:
        if not (r.get("time_us") and r.get("world_size") and r.get("bytes") is not None):
            continue
        key = group_key(r)
        (held_groups if key[3] in holdout_links else groups).setdefault(key, []).append(r)
    out = {}
    for key, recs in groups.items():
        if len(recs) < 3:
            continue
        link, rpn = key[3], key[4]
        shared = rpn is None
        entry = {"model": fit(recs, link, shared), "checks": []}
        sizes = sorted({int(r["world_size"]) for r in recs})
        if len(sizes) >= 3:
            for kind, hold in (("interpolate", sizes[len(sizes) // 2]), ("extrapolate", sizes[-1])):
                for row in held_back_check(recs, link, hold, shared):
                    entry["checks"].append(dict(check=kind, **row))
        if link_rate_bps(link) is not None:
            for hl in holdout_links:
                hkey = key[:3] + (hl, rpn)
                if hkey in held_groups:
                    for row in held_back_link_check(recs + held_groups[hkey], link, hl, shared):
                        entry["checks"].append(dict(check=f"link {link}->{hl}", **row))
        out[key] = entry
    return out
