"""Agreement across ranks: did every rank call this collective with the same arguments?

The one mechanism of the project (the backend, the sparse/quantized collectives and
`Communicator.check_uniform` all use it). Each rank contributes an int64 vector
``(flag, codes..., -flag, -codes...)``: `flag` is 1 where the rank rejected its own
arguments, `codes` encode its signature (shapes, dtypes, reduction, root, ...). One
MAX-allreduce yields ``(max, -min)`` of every slot, so all ranks agree iff the result
equals what this rank sent, and a set flag tells every rank that some rank rejected its
arguments. Wire bytes: 16 int64 (128 B) per check for a fixed-size signature.

The switch is torch's ``TORCH_DISTRIBUTED_DEBUG`` (read when a group is created):

- ``OFF`` / ``INFO`` (default): the check travels with the operation: the transport posts
  it non-blocking just before the data collective, on the same communicator (so MPI
  orders it identically on every rank), and the operation's `Request` waits for it first
  (``check=`` on every `Communicator` collective; `Request.agreed`). No extra round trip.
- ``DETAIL``: the same check posted alone (`Communicator.iagree`) and waited for before
  the data collective is posted (a blocking round trip per call): a mismatch never
  reaches MPI.

`TableCheck` is the variant for all-to-all, whose splits must match pairwise rather than be
equal: every rank's (flag, code, send counts, receive counts) row is all-gathered. It is
waited like a transport Request (`wait`, `test`, `wait_or_wake`).
"""
from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SIGNATURE_SLOTS", "TableCheck", "check_uniform", "debug_detail",
           "encode_signature", "encode_values"]

# Codes per fixed-size signature (slot 0 is the flag). Fixed, so that ranks that even
# disagree on *which* collective they call still post matching checks.
SIGNATURE_SLOTS = 8

def debug_detail() -> bool:
    """Whether ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` asks for the blocking agreement."""
    return os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF").strip().upper() == "DETAIL"


_codes: dict[Any, int] = {}


def _code(value: Any) -> int:
    """An int standing for one element of a signature, equal on every rank."""
    if type(value) is int:
        return value
    code = _codes.get(value)
    if code is None:
        code = zlib.crc32(repr(value).encode()) & 0x7FFFFFFF
        if isinstance(value, (str, bool)) or type(value).__name__ == "dtype":
            _codes[value] = code
    return code


def encode_values(values: Sequence[int], flag: bool = False) -> np.ndarray:
    """(flag, values..., -flag, -values...) as int64: what a check reduces, exact values."""
    n = len(values) + 1
    encoded = np.zeros(2 * n, dtype=np.int64)
    encoded[0] = 1 if flag else 0
    encoded[1:n] = values
    encoded[n:] = -encoded[:n]
    return encoded


def encode_signature(signature: tuple | None) -> np.ndarray:
    """A signature (any tuple of ints, strings, dtypes, nested tuples) as the fixed-size
    check vector; None stands for "this rank rejected its arguments" (flag set)."""
    n = SIGNATURE_SLOTS
    if signature is None:
        return encode_values([0] * (n - 1), flag=True)
    codes = [_code(v) for v in signature]
    if len(codes) > n - 1:  # a long signature: its tail folded into one hash
        codes[n - 2:] = [zlib.crc32(repr(codes[n - 2:]).encode())]
    codes.extend([0] * (n - 1 - len(codes)))
    return encode_values(codes)


class TableCheck:
    """A posted all-gather of every rank's row ``(flag, code, send counts, recv counts)``
    (P send and P receive counts): all-to-all splits must match pairwise. `wait()`/`test()`
    like a transport Request's check; `problem()` then says what is wrong, or None."""

    __slots__ = ("row", "table", "request", "lock", "done", "size")

    def __init__(self, comm: Any, code: int, send: Sequence[int], recv: Sequence[int],
                 rejected: bool) -> None:
        P = comm.size
        self.size = P
        self.row = np.zeros(2 * P + 2, dtype=np.int64)
        if rejected:
            self.row[0] = 1
        else:
            self.row[1] = code
            self.row[2:2 + P] = send
            self.row[2 + P:] = recv
        self.table = np.empty((P, 2 * P + 2), dtype=np.int64)
        self.request = comm.mpi.Iallgather(self.row, self.table)
        self.lock = threading.Lock()
        self.done = False

    def wait(self) -> TableCheck:
        if not self.done:
            with self.lock:
                if not self.done:
                    self.request.Wait()
                    self.done = True
        return self

    def wait_or_wake(self, wakeup: Any) -> bool:
        """`wait()`, unless `wakeup` (a transport `Wakeup`) fires first: then False."""
        if not self.done:
            with self.lock:
                if not self.done:
                    if not wakeup.wait(self.request):
                        return False
                    self.done = True
        return True

    def test(self) -> bool:
        if self.done:
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if not self.done and self.request.Test():
                self.done = True
        finally:
            self.lock.release()
        return self.done

    @property
    def rejected(self) -> bool:
        return bool(self.table[:, 0].any())

    @property
    def all_rejected(self) -> bool:
        return bool(self.table[:, 0].all())

    @property
    def agreed(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """None if every rank accepted its arguments and the splits match pairwise."""
        P, table = self.size, self.table
        if table[:, 0].any():
            return "another rank rejected its arguments for this collective (see its error)"
        if (table[:, 1] != table[0, 1]).any():
            return "the ranks disagree on the dtype or the row shape"
        sends, recvs = table[:, 2:2 + P], table[:, 2 + P:]
        bad = np.argwhere(sends != recvs.T)
        if len(bad):
            i, j = (int(x) for x in bad[0])
            return (f"the splits do not add up: rank {i} sends {int(sends[i, j])} elements to "
                    f"rank {j}, which expects {int(recvs[j, i])} from it")
        return None


def check_uniform(comm: Any, values: Sequence[int], what: str) -> None:
    """Collective, blocking: raise ValueError on every rank unless all ranks of `comm` passed
    equal `values` (every rank must pass the same number of values)."""
    if comm.size == 1:
        return
    check = comm.iagree(encode_values(values).tobytes()).wait()
    if not check.agreed:
        raise ValueError(f"{what} differs across ranks: per-position min {check.low}, max "
                         f"{check.high} (this rank: {list(values)})")
