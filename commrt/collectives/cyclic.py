"""Cyclic ring schedules: ring reductions whose progress is driven explicitly by the caller.

A training loop that wants its communication spread over a step (Cyclic Data Parallelism,
docs/design.md §5) cannot hand a whole all-reduce to MPI at the end of the step: it wants
one small point-to-point transfer between every two pieces of compute. `CyclicRing` is that
collective. It reduces one or more *stage* tensors around the ring of ranks
0 -> 1 -> ... -> P-1 -> 0 with the classic chunked ring algorithm, one ring step per call::

    ring = CyclicRing([grad_stage0, grad_stage1], comm)     # nothing sent yet
    ring.start(1)              # stage 1's gradient is ready: post its first transfer
    compute(...)
    ring.advance()             # complete the previous transfer of every started stage,
    compute(...)               #   post the next one (non-blocking), record it
    ring.start(0); ring.advance(); ...
    summed = ring.finish()     # drain what remains; the stage tensors now hold the sums

Each stage tensor (flattened) is split into P chunks (sizes differ by at most one element,
no padding). In reduce-scatter step s (s = 0 .. P-2) rank r sends chunk (r - s) mod P to
rank r+1 and adds the chunk (r - s - 1) mod P arriving from rank r-1; afterwards rank r
holds the complete sum of chunk ``owned_chunk(r, P) = (r + 1) mod P``. In all-gather step
s rank r sends chunk (r + 1 - s) mod P and receives chunk (r - s) mod P in place. Modes:
``"allreduce"`` (both phases, 2(P-1) steps per stage), ``"reduce_scatter"`` (P-1 steps;
only the owned chunk is meaningful afterwards) and ``"allgather"`` (P-1 steps: every rank
contributes its owned chunk, everybody ends with all of them; this is how CDP passes
parameter shards along the same ring instead of broadcasting them).

Progress: `advance()` is non-blocking. For every started stage it folds in the transfer
posted earlier if it has arrived and then posts the stage's next one, so a stage moves at
most one step per call and its 2(P−1) transfers are spread over at least 2(P−1) calls;
`wait_stage`/`finish` poll (never blocking on a single request, so several rings driven
by one caller cannot wait on each other) until done. With ``lockstep=True`` `advance()`
instead waits for the previous transfer, so that every stage moves exactly one step per
call: the schedule (which transfer at which call) is then identical on every rank and
every run, the form the schedule tests check. Messages are matched by (tag, stage, step),
so the two forms move the same bytes to the same places. `schedule` records, for every
transfer, the `advance` call at which it was posted.

Per-rank wire bytes (exact, counted by the transport under ``kind``; B_l the bytes of
stage l, c_j the bytes of chunk j of that stage):
  allreduce:      Σ_l (2·B_l − c_{(r+1) mod P} − c_{(r+2) mod P})  ≈ 2(P−1)/P · Σ B_l
  reduce_scatter: Σ_l (B_l − c_{(r+1) mod P})                      ≈ (P−1)/P · Σ B_l
  allgather:      Σ_l (B_l − c_{(r+2) mod P})                      ≈ (P−1)/P · Σ B_l
in 2(P−1), P−1, P−1 messages per stage respectively. `expected_wire_bytes` computes it.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commrt import transports as T

__all__ = ["CyclicRing", "RingTransfer", "chunk_bounds", "owned_chunk",
           "expected_wire_bytes", "cyclic_allreduce"]

_MODES = ("allreduce", "reduce_scatter", "allgather")
_TAG_LIMIT = 32767  # the smallest MPI_TAG_UB the standard allows


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` near-equal chunks of `numel` elements (the first
    numel % parts chunks are one element longer)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for j in range(parts):
        end = start + base + (1 if j < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def owned_chunk(rank: int, size: int) -> int:
    """The chunk whose full sum rank `rank` holds after the reduce-scatter phase (and the
    chunk it contributes in ``"allgather"`` mode)."""
    return (rank + 1) % size


def expected_wire_bytes(numels: Sequence[int], element_size: int, rank: int, size: int,
                        mode: str = "allreduce") -> int:
    """The exact bytes rank `rank` sends for stages of `numels` elements (see module doc)."""
    if mode not in _MODES:
        raise ValueError(f"unknown ring mode {mode!r}; expected one of {_MODES}")
    if size == 1:
        return 0
    total = 0
    for n in numels:
        sizes = [(e - s) * element_size for s, e in chunk_bounds(n, size)]
        whole = n * element_size
        rs = whole - sizes[(rank + 1) % size]
        ag = whole - sizes[(rank + 2) % size]
        total += {"allreduce": rs + ag, "reduce_scatter": rs, "allgather": ag}[mode]
    return total


@dataclass(frozen=True)
class RingTransfer:
    """One posted ring step of one stage (as seen by this rank)."""

    advance_index: int  # number of `advance` calls made before it was posted
    stage: int
    step: int           # 0 .. steps_per_stage-1
    phase: str          # "reduce_scatter" or "allgather"
    send_chunk: int
    recv_chunk: int
    nbytes: int         # bytes this rank sent in this step


class _StageState:
    __slots__ = ("flat", "orig", "bounds", "next_step", "inflight", "recv_buf", "done",
                 "inflight_bytes", "started", "copy_back")

    def __init__(self, flat: torch.Tensor, orig: torch.Tensor, bounds):
        self.flat = flat
        self.orig = orig
        self.bounds = bounds
        self.next_step = 0
        self.inflight: list[Any] = []
        self.recv_buf: tuple[torch.Tensor, int] | None = None
        self.done = False
        self.inflight_bytes = 0
        self.started = False
        self.copy_back = flat.numel() > 0 and flat.data_ptr() != orig.data_ptr() or \
            not orig.is_contiguous()


class CyclicRing:
    """A ring reduction of `stages` over `group`, advanced one step per `advance()` call.

    stages: a tensor or a list of tensors (any shapes; same shapes, dtype and order on
        every rank). They are reduced in place: after `finish()` (or after `wait_stage`)
        a stage tensor holds the sum over ranks (``"allreduce"``), or is complete only in
        its owned chunk (``"reduce_scatter"``), or holds every rank's owned chunk
        (``"allgather"``). Non-contiguous tensors are worked on as a flat copy and written
        back on completion.
    group: None, a Communicator or a torch ProcessGroup (`commrt.transports.for_group`).
    average: divide the reduced chunks by the number of ranks (mean instead of sum).
    tag: first MPI tag of this ring; a ring uses tags tag .. tag + stages·2(P−1) − 1, so
        rings that are in flight at the same time must use disjoint ranges.
    kind: the wire-byte counter label (default ``"cyclic_<mode>"``).
    lockstep: False (default): `advance()` never blocks; a stage whose previous transfer
        has not arrived yet simply skips this call. True: `advance()` waits for it, so
        every stage moves exactly one step per call and the schedule (which transfer at
        which call) is the same on every rank and every run.
    """

    def __init__(self, stages: torch.Tensor | Sequence[torch.Tensor], group: Any = None, *,
                 mode: str = "allreduce", average: bool = False, tag: int = 7000,
                 kind: str | None = None, lockstep: bool = False):
        if mode not in _MODES:
            raise ValueError(f"unknown ring mode {mode!r}; expected one of {', '.join(_MODES)}")
        self.single = isinstance(stages, torch.Tensor)
        tensors = [stages] if self.single else list(stages)
        if not tensors:
            raise ValueError("CyclicRing needs at least one stage tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"stage {i} is a {type(t).__name__}, not a torch.Tensor")
        self.comm = T.for_group(group)
        self.mode = mode
        self.average = average
        self.kind = kind or f"cyclic_{mode}"
        size = self.comm.size
        self.steps_per_stage = 0 if size == 1 else (2 * (size - 1) if mode == "allreduce"
                                                    else size - 1)
        last_tag = tag + len(tensors) * max(self.steps_per_stage, 1)
        if tag < 0 or last_tag > _TAG_LIMIT:
            raise ValueError(f"ring tags {tag}..{last_tag} leave the portable MPI tag range "
                             f"0..{_TAG_LIMIT}: lower `tag` or use fewer stages")
        self.tag = tag
        self.lockstep = lockstep
        self.progress_events = 0      # transfers landed or posted so far (idle detection)
        self.left = (self.comm.rank - 1) % size
        self.right = (self.comm.rank + 1) % size
        self._stages: list[_StageState] = []
        for t in tensors:
            flat = t.view(-1) if t.is_contiguous() else t.reshape(-1).clone()
            self._stages.append(_StageState(flat, t, chunk_bounds(flat.numel(), size)))
        self._order: list[int] = []   # started stages, in start order
        self.advance_calls = 0
        self.schedule: list[RingTransfer] = []
        self.wait_seconds = 0.0       # time spent blocked in MPI waits (exposed comm)
        self.in_flight_bytes = 0
        self.peak_in_flight_bytes = 0
        self.landed_bytes = 0         # bytes of completed transfers
        self.overlapped_bytes = 0     # ... of which had completed before we waited for them

    # -- public driving interface ------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def start(self, stage: int | Sequence[int] | None = None) -> None:
        """Start the reduction of `stage` (an index, a list, or None for every stage not
        yet started) and post its first transfer at once (non-blocking)."""
        if stage is None:
            ids = [i for i, s in enumerate(self._stages) if not s.started]
        elif isinstance(stage, int):
            ids = [stage]
        else:
            ids = list(stage)
        for i in ids:
            if not 0 <= i < len(self._stages):
                raise ValueError(f"stage {i} out of range: this ring has "
                                 f"{len(self._stages)} stages")
            st = self._stages[i]
            if st.started:
                raise RuntimeError(f"stage {i} of this ring was already started")
            st.started = True
            self._order.append(i)
            if self.steps_per_stage == 0:
                self._complete(i)
            else:
                self._post(i)

    def advance(self) -> bool:
        """At most one ring step for every started, unfinished stage: fold in the transfer
        posted at an earlier call if it has arrived (lockstep: wait for it), then post the
        stage's next transfer. Non-blocking unless `lockstep`. Returns whether any started
        stage still has transfers in flight or to post."""
        self.advance_calls += 1
        self._step_all(block=self.lockstep, exposed=False)
        return self.pending()

    def _step_all(self, block: bool, exposed: bool) -> None:
        for i in self._order:
            st = self._stages[i]
            if st.done:
                continue
            if st.inflight and not self._land(i, block, exposed):
                continue
            if st.next_step < self.steps_per_stage:
                self._post(i)
            else:
                self._complete(i)

    def _drain_once(self) -> None:
        """One pass of the completion loops: never block on one request (other rings of
        the caller, and other ranks, may be needed first); yield the CPU when idle."""
        before = self.progress_events
        self.advance_calls += 1
        self._step_all(block=self.lockstep, exposed=True)
        if self.progress_events == before:
            time.sleep(2e-5)

    def pending(self) -> bool:
        """Whether a started stage is not complete yet."""
        return any(not self._stages[i].done for i in self._order)

    def stage_done(self, stage: int) -> bool:
        return self._stages[stage].done

    def wait_stage(self, stage: int) -> torch.Tensor:
        """Progress every started stage of this ring until `stage` is complete; return its
        tensor (time spent here counts as exposed in `wait_seconds`)."""
        st = self._stages[stage]
        if not st.started:
            raise RuntimeError(f"stage {stage} was never started")
        t0 = time.perf_counter()
        while not st.done:
            self._drain_once()
        self.wait_seconds += time.perf_counter() - t0
        return st.orig

    def finish(self) -> torch.Tensor | list[torch.Tensor]:
        """Start any stage not started yet, drain every transfer and return the result
        (the tensor, or the list of stage tensors)."""
        if any(not s.started for s in self._stages):
            self.start(None)
        t0 = time.perf_counter()
        while self.pending():
            self._drain_once()
        self.wait_seconds += time.perf_counter() - t0
        out = [s.orig for s in self._stages]
        return out[0] if self.single else out

    def transfers_per_call(self) -> dict[int, int]:
        """{advance index: number of transfers posted at it} (for checking spread)."""
        out: dict[int, int] = {}
        for t in self.schedule:
            out[t.advance_index] = out.get(t.advance_index, 0) + 1
        return out

    # -- internals -------------------------------------------------------------------------

    def _chunk(self, st: _StageState, j: int) -> torch.Tensor:
        a, b = st.bounds[j % self.comm.size]
        return st.flat[a:b]

    def _post(self, i: int) -> None:
        st = self._stages[i]
        size, rank = self.comm.size, self.comm.rank
        s = st.next_step
        if self.mode == "allgather" or (self.mode == "allreduce" and s >= size - 1):
            phase = "allgather"
            g = s - (size - 1) if self.mode == "allreduce" else s
            send_j, recv_j = (rank + 1 - g) % size, (rank - g) % size
        else:
            phase = "reduce_scatter"
            send_j, recv_j = (rank - s) % size, (rank - s - 1) % size
        tag = self.tag + i * self.steps_per_stage + s
        send = self._chunk(st, send_j)
        target = self._chunk(st, recv_j)
        if phase == "reduce_scatter":
            buf = torch.empty_like(target)
            st.recv_buf = (buf, recv_j)
        else:
            buf = target  # all-gather chunks arrive in place
            st.recv_buf = None
        recv_req = self.comm.irecv(buf, self.left, tag, kind=self.kind)
        send_req = self.comm.isend(send, self.right, tag, kind=self.kind)
        nbytes = send.numel() * send.element_size()
        st.inflight = [send_req, recv_req]
        st.inflight_bytes = nbytes
        self.in_flight_bytes += nbytes
        self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self.in_flight_bytes)
        st.next_step = s + 1
        self.progress_events += 1
        self.schedule.append(RingTransfer(self.advance_calls, i, s, phase, send_j, recv_j,
                                          nbytes))

    def _land(self, i: int, block: bool, exposed: bool) -> bool:
        """Complete stage i's in-flight transfer if it has arrived (or, with `block`, wait
        for it); returns whether it is complete."""
        st = self._stages[i]
        arrived = all(req.test() for req in st.inflight)
        if not arrived:
            if not block:
                return False
            t0 = time.perf_counter()
            for req in st.inflight:
                req.wait()
            self.wait_seconds += time.perf_counter() - t0
        elif not exposed:
            self.overlapped_bytes += st.inflight_bytes
        self.landed_bytes += st.inflight_bytes
        self.progress_events += 1
        st.inflight = []
        self.in_flight_bytes -= st.inflight_bytes
        st.inflight_bytes = 0
        if st.recv_buf is not None:
            buf, j = st.recv_buf
            self._chunk(st, j).add_(buf)
            st.recv_buf = None
        return True

    def _complete(self, i: int) -> None:
        st = self._stages[i]
        size, rank = self.comm.size, self.comm.rank
        if self.average and size > 1:
            if self.mode == "allreduce":
                st.flat.div_(size)
            elif self.mode == "reduce_scatter":
                self._chunk(st, owned_chunk(rank, size)).div_(size)
        if st.copy_back:
            st.orig.copy_(st.flat.view(st.orig.shape))
        st.done = True


def cyclic_allreduce(stages: torch.Tensor | Sequence[torch.Tensor], group: Any = None, *,
                     average: bool = False, tag: int = 7000):
    """Blocking convenience: start every stage, drain the ring, return the sums."""
    ring = CyclicRing(stages, group, average=average, tag=tag)
    ring.start()
    return ring.finish()
