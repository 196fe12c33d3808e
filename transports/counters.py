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

import collections
import threading
from collections import defaultdict


class WireCounter:
    """Thread-safe tally of bytes and messages by kind (a string label).

    `add` is on every operation's path, so it only appends to a deque (atomic, no lock);
    the tallies absorb the pending entries under a lock when read, or when many are
    pending.
    """

    PENDING_LIMIT = 4096  # entries folded into the tallies by `add` itself beyond this

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._bytes: dict[str, int] = defaultdict(int)
        self._messages: dict[str, int] = defaultdict(int)
        self._received: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int, messages: int = 1) -> None:
        # int(): a numpy integer would turn the tally into one.
        self._pending.append((kind, int(nbytes), messages))
        if len(self._pending) > self.PENDING_LIMIT:
            with self._lock:
                self._absorb()

    def _absorb(self) -> None:
        """Fold the pending entries into the tallies (the caller holds the lock)."""
        pending, tally, count = self._pending, self._bytes, self._messages
        while True:
            try:
                kind, nbytes, messages = pending.popleft()
            except IndexError:
                return
            tally[kind] += nbytes
            count[kind] += messages

    def add_received(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._received[kind] += int(nbytes)

    def bytes(self, kind: str | None = None) -> int:
        """Bytes sent under `kind`, or in total when kind is None."""
        with self._lock:
            self._absorb()
            return sum(self._bytes.values()) if kind is None else self._bytes.get(kind, 0)

    def total_bytes(self) -> int:
        return self.bytes()

    def messages(self, kind: str | None = None) -> int:
        with self._lock:
            self._absorb()
            return sum(self._messages.values()) if kind is None else self._messages.get(kind, 0)

    def received(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(self._received.values()) if kind is None else self._received.get(kind, 0)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """{kind: (bytes, messages)} at this moment; subtract two snapshots for a window."""
        with self._lock:
            self._absorb()
            return {k: (self._bytes[k], self._messages[k]) for k in self._bytes}

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self._bytes.clear()
            self._messages.clear()
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
