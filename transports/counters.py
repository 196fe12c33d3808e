"""Wire-byte counters: every byte a rank puts on the wire, by collective kind.

Tests assert communication volume against the formulas in each collective's docstring,
and the training script reports bytes per step, so the accounting rule matters:

- point-to-point sends count exactly the bytes sent (receives are tallied apart, under
  `received`, and never added to the sent total);
- dense collectives delegated to MPI count the per-rank volume of a bandwidth-optimal
  algorithm on the bytes that actually travel (after any upcast):
  allreduce 2(P-1)/P * B; reduce-scatter and all-gather (P-1)/P * (whole array);
  all-to-all(v) the bytes addressed to other ranks; broadcast and reduce (P-1)/P * B;
  gather/scatter the bytes a rank sends (its block, or the root's P-1 blocks).
  MPI's internals are not observable, so this is the algorithm's volume, not a packet count.
"""
from __future__ import annotations

import threading
from collections import defaultdict


class WireCounter:
    """Thread-safe tally of bytes and messages by kind (a string label).

    `add` is on every operation's path, so it takes no lock: each thread adds into a
    tally of its own ({kind: [bytes, messages]}, written by that thread alone), and readers
    sum the threads' tallies. `reset` does not touch them either: it records the current
    totals as the zero that later readings subtract.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._tallies: list[dict[str, list[int]]] = []  # every thread's, ever
        self._zero: dict[str, tuple[int, int]] = {}
        self._received: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int, messages: int = 1) -> None:
        try:
            tally = self._local.tally
        except AttributeError:
            tally = self._local.tally = {}
            with self._lock:
                self._tallies.append(tally)
        entry = tally.get(kind)
        if entry is None:
            # int(): a numpy integer would turn the tally into one.
            tally[kind] = [int(nbytes), messages]
        else:
            entry[0] += int(nbytes)
            entry[1] += messages

    def _totals(self) -> dict[str, tuple[int, int]]:
        """{kind: (bytes, messages)} since the last reset (the caller holds the lock)."""
        totals: dict[str, list[int]] = {}
        for tally in self._tallies:
            for kind, entry in list(tally.items()):  # (a copy: its thread may add a kind)
                nbytes, messages = entry
                total = totals.setdefault(kind, [0, 0])
                total[0] += nbytes
                total[1] += messages
        zero = self._zero
        return {k: (b - zero.get(k, (0, 0))[0], m - zero.get(k, (0, 0))[1])
                for k, (b, m) in totals.items()}

    def add_received(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._received[kind] += int(nbytes)

    def bytes(self, kind: str | None = None) -> int:
        """Bytes sent under `kind`, or in total when kind is None."""
        with self._lock:
            totals = self._totals()
        if kind is None:
            return sum(b for b, _ in totals.values())
        return totals.get(kind, (0, 0))[0]

    def total_bytes(self) -> int:
        return self.bytes()

    def messages(self, kind: str | None = None) -> int:
        with self._lock:
            totals = self._totals()
        if kind is None:
            return sum(m for _, m in totals.values())
        return totals.get(kind, (0, 0))[1]

    def received(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(self._received.values()) if kind is None else self._received.get(kind, 0)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """{kind: (bytes, messages)} at this moment; subtract two snapshots for a window."""
        with self._lock:
            return {k: v for k, v in self._totals().items() if v != (0, 0)}

    def reset(self) -> None:
        with self._lock:
            self._zero = {}  # (so that _totals() returns the raw sums)
            self._zero = self._totals()
            self._received.clear()


def snapshot_delta(after: dict[str, tuple[int, int]],
                   before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Per-kind (bytes, messages) sent between two snapshots."""
    out = {}
    for kind, (b, m) in after.items():
        b0, m0 = before.get(kind, (0, 0))
        if b != b0 or m != m0:
            out[kind] = (b - b0, m - m0)
    return out


#: The process-wide counter every communicator of this process adds into.
wire = WireCounter()
