"""Where a collective's wall time goes: blocked in transport waits, or everything else.

The collectives wait for their requests through `wait`, which adds the time blocked to a
per-thread running total; a call site reads `waited()` before and after a call, so
`last["wait_s"]` (waiting: the link, and slower ranks) and `last["compute_s"]` (the rest:
local kernels, packing, Python) of the sparse and quantized allreduces need no profiler.
Costs two perf_counter reads per wait.
"""
from __future__ import annotations

import threading
import time
from typing import Any

_local = threading.local()


def wait(*requests: Any) -> None:
    """Wait for every request, in order, adding the time blocked to this thread's total."""
    start = time.perf_counter()
    for request in requests:
        request.wait()
    _local.wait_s = waited() + time.perf_counter() - start


def waited() -> float:
    """Seconds this thread has spent in `wait` so far (a running total: take differences)."""
    return getattr(_local, "wait_s", 0.0)


def mark() -> tuple[float, float]:
    """A starting point for `split`: (now, this thread's wait total)."""
    return time.perf_counter(), waited()


def split(since: tuple[float, float]) -> dict[str, float]:
    """Wall time since the `mark` `since`: {"time_s", "wait_s", "compute_s"}, where
    compute_s = time_s - wait_s is everything but waiting on the transport."""
    total = time.perf_counter() - since[0]
    wait_s = waited() - since[1]
    return {"time_s": total, "wait_s": wait_s, "compute_s": total - wait_s}
