"""The wire counter (commrt.transports.WireCounter) against a plain per-kind sum of the same
random additions, made from several threads at once, across resets and snapshots (the seed
is printed on failure)."""
import random
import threading
from collections import Counter

import numpy as np

import commrt.transports as K

KINDS = ("all_reduce", "all_gather", "send", "sparse")


def _additions(rng: random.Random, n: int) -> list[tuple[str, int, int]]:
    return [(rng.choice(KINDS), rng.randrange(0, 1 << 20), rng.randrange(1, 4)) for _ in range(n)]


def _reference(additions) -> tuple[Counter, Counter]:
    nbytes, messages = Counter(), Counter()
    for kind, b, m in additions:
        nbytes[kind] += b
        messages[kind] += m
    return nbytes, messages


def _add_from_threads(counter: K.WireCounter, per_thread: list[list]) -> None:
    start = threading.Barrier(len(per_thread))

    def run(additions) -> None:
        start.wait()
        for kind, b, m in additions:
            counter.add(kind, b, m)
    threads = [threading.Thread(target=run, args=(adds,)) for adds in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_wire_counter_sums_concurrent_additions(seed):
    rng = random.Random(seed)
    counter = K.WireCounter()
    per_thread = [_additions(rng, 20_000) for _ in range(4)]
    _add_from_threads(counter, per_thread)
    nbytes, messages = _reference([a for adds in per_thread for a in adds])
    for kind in KINDS:
        assert counter.bytes(kind) == nbytes[kind]
        assert counter.messages(kind) == messages[kind]
    assert counter.bytes() == counter.total_bytes() == sum(nbytes.values())
    assert counter.messages() == sum(messages.values())
    assert counter.snapshot() == {k: (nbytes[k], messages[k]) for k in nbytes}


def test_wire_counter_reset_and_snapshot_windows(seed):
    rng = random.Random(seed)
    counter = K.WireCounter()
    _add_from_threads(counter, [_additions(rng, 3_000) for _ in range(3)])
    counter.add_received("recv", 7)
    counter.reset()
    assert counter.bytes() == 0 and counter.messages() == 0 and counter.snapshot() == {}
    assert counter.received() == 0
    # After a reset, a window between two snapshots sees exactly what was added in it,
    # including additions by threads that had added before the reset.
    before_adds = [_additions(rng, 2_000) for _ in range(3)]
    _add_from_threads(counter, before_adds)
    before = counter.snapshot()
    window_adds = [_additions(rng, 2_000) for _ in range(3)]
    _add_from_threads(counter, window_adds)
    nbytes, messages = _reference([a for adds in window_adds for a in adds])
    delta = K.snapshot_delta(counter.snapshot(), before)
    assert delta == {k: (nbytes[k], messages[k]) for k in nbytes}
    total, _ = _reference([a for adds in before_adds + window_adds for a in adds])
    assert counter.bytes() == sum(total.values())


def test_wire_counter_keeps_python_ints():
    counter = K.WireCounter()
    counter.add("all_reduce", np.int64(5))
    counter.add("all_reduce", np.int32(6))
    assert counter.bytes("all_reduce") == 11
    assert type(counter.bytes("all_reduce")) is int
