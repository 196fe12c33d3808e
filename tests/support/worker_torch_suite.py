"""One rank of a torch-suite job: PyTorch's ``DistributedTest._DistTestBase`` under mpirun.

Usage (started by `torch_suite.run_suite`, never by hand)::

    mpirun -n 3 python tests/support/worker_torch_suite.py BACKEND JOB_DIR DONE_FILE SELECT_JSON

DONE_FILE names tests an earlier job of the run already decided; SELECT_JSON is a list of
substrings (empty: every test).

Every rank runs every test method the way torch once ran its MPI backend: the rank is
the MPI rank, and each test gets what ``TestDistBackend._run`` gives it in torch's own
harness, a fresh default process group (``file://`` rendezvous, torch's per-test
timeout), a fresh ``TEMP_DIR`` (its file barrier and test dirs), torch's RNG seed, then
the method, then the process group is destroyed.

Gates. torch decides at import which tests a backend runs (``BACKEND != "gloo"``,
``BACKEND not in DistTestCases.backend_feature["ddp"]``...). Here a test runs if torch
opens its CPU gates for ``gloo`` or for ``mpi``, whichever backend runs it (commrt; gloo,
for comparison, gets the same gates, so pass counts compare the same tests): the module
is imported as the suite for the backend and once more for each of those two names, and
a test that torch marks skipped for the backend but not for gloo or mpi is run all the
same (its skip mark is attribute-only, so calling the method runs it). Inside the test
bodies ``BACKEND`` is a `GateName` that names the backend but compares equal to "gloo"
and "mpi" (the bodies pick their CPU code path with ``if BACKEND == "mpi" or BACKEND ==
"gloo"``), and the two runtime gates that read ``os.environ["BACKEND"]`` and never skip
for mpi (``skip_if_small_worldsize``, ``skip_if_odd_worldsize``: at 3 ranks they would
skip the group tests) are opened.

A test may change os.environ (torch's ``with_dist_debug_levels`` leaves
TORCH_DISTRIBUTED_DEBUG set): it is restored after each test, as a process of its own
would have it in torch's harness.

Outcomes. Each rank writes its outcome (passed, skipped, failed, error; with the
reason or traceback) to ``JOB_DIR/outcome/``, then the ranks agree with an allreduce on
a communicator of the harness's own (a duplicate of MPI_COMM_WORLD made before any test,
so an operation a test left posted on the backend's communicators cannot match it): the
worst outcome wins. Rank 0 appends the agreed record to ``JOB_DIR/results.jsonl``.

Watchdog. ``faulthandler.dump_traceback_later(exit=True)`` is armed for each test (a C
thread: it fires even if a rank is stuck in C code holding the GIL); on expiry the rank
writes every thread's stack to ``JOB_DIR/stacks_RANK.txt`` and exits, which ends the
job. The runner then records that test as hung (naming the ranks that did not finish)
and starts a new job with the remaining tests. A job also ends, cleanly, after a test
that did not pass or skip (the backend's communicators may hold unmatched operations)
and after a test in `ENDS_JOB`.
"""
from __future__ import annotations

import faulthandler
import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
import unittest
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

WORLD_SIZE_FOR_SUITE = 3
SUITE_MODULE = "torch.testing._internal.distributed.distributed_test"
# The backends whose CPU gates are opened for commrt (see the module docstring).
GATE_BACKENDS = ("gloo", "mpi")
# Outcomes, mildest first: the ranks agree on the worst one.
OUTCOMES = ("passed", "skipped", "failed", "error")
# Seconds a test may run (rendezvous, the test, agreement, teardown) before its watchdog
# ends the job (the slowest test takes ~4 s on a loaded 2-core machine). The
# timeout tests expect their barrier to fail after 0-5 s.
DEFAULT_TEST_LIMIT_S = 60.0
TEST_LIMIT_S = {"test_ddp_uneven_inputs": 360.0, "test_barrier_timeout_global": 30.0,
                "test_barrier_timeout_group": 30.0, "test_barrier_timeout_full_group": 30.0,
                "test_monitored_barrier_gloo_rank_0_timeout": 30.0}
# A rank whose test failed waits this long for the other ranks to finish theirs before
# it ends the job (they may be stuck in a collective it never joined).
FAILED_RANK_GRACE_S = 15.0
# Tests that leave an operation posted by design (a barrier that times out on one rank,
# which MPI cannot cancel): nothing may run after them in the same job.
ENDS_JOB = ("test_barrier_timeout_global", "test_barrier_timeout_group",
            "test_barrier_timeout_full_group")


class GateName(str):
    """The suite's ``BACKEND`` inside test bodies: the backend's name (what
    init_process_group and get_backend see) that compares equal to the names in
    `GATE_BACKENDS` too, so a body's ``if BACKEND == "gloo"`` takes the CPU path those
    backends take. Hashes as the backend's name (set membership is not widened)."""

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other) is True or other in GATE_BACKENDS

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


# --------------------------------------------------------------------------------------
# Files of a job directory (the runner reads them too)


def outcome_path(job_dir: Path, index: int, rank: int) -> Path:
    return job_dir / "outcome" / f"{index:04d}_{rank}.json"


def start_path(job_dir: Path, index: int, rank: int) -> Path:
    return job_dir / "started" / f"{index:04d}_{rank}"


def stacks_path(job_dir: Path, rank: int) -> Path:
    return job_dir / f"stacks_{rank}.txt"


def selected(name: str, select: list[str]) -> bool:
    """Whether a run restricted to names containing one of `select` runs `name`."""
    return not select or any(s in name for s in select)


def test_limit_s(name: str) -> float:
    return TEST_LIMIT_S.get(name, DEFAULT_TEST_LIMIT_S)


# --------------------------------------------------------------------------------------
# Importing the suite and opening its gates


def _open_as_for_mpi(original: Callable) -> Callable:
    """`original`, a torch decorator that skips unless ``os.environ["BACKEND"] == "mpi"``,
    opened as for mpi: for mpi it never skips, so the method runs as it is."""
    source = inspect.getsource(original)
    if 'os.environ["BACKEND"] != "mpi"' not in source:
        raise RuntimeError(f"torch changed {original.__name__}; review how "
                           "tests/support/worker_torch_suite.py opens it")
    return lambda func: func


def _load_copy(backend: str) -> Any:
    """A private copy of the suite module as torch builds it for `backend` (its gates)."""
    path = sys.modules[SUITE_MODULE].__file__
    spec = importlib.util.spec_from_file_location(f"_torch_suite_gates_{backend}", path)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ["BACKEND"]
    os.environ["BACKEND"] = backend
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ["BACKEND"] = previous
    return module


def _skip_reason(name: str, references: list[Any]) -> str:
    """Why torch skips `name`: the reasons it gives gloo and mpi (the gates that stay
    closed)."""
    def why(cls: type) -> str:
        return str(getattr(getattr(cls, name), "__unittest_skip_why__", "")) or "(no reason)"

    reasons = {b: why(ref.DistributedTest._DistTestBase)
               for b, ref in zip(GATE_BACKENDS, references)}
    if len(set(reasons.values())) == 1:
        return f"{next(iter(reasons.values()))} (for gloo and mpi alike)"
    return "; ".join(f"for {b}: {r}" for b, r in reasons.items())


def import_suite(backend: str) -> tuple[Any, list[dict]]:
    """Import the suite for `backend`; return it and the plan: every test method in
    torch's order (sorted), each ``{"name", "run", "reason", "opened_by"}``."""
    os.environ["BACKEND"] = backend
    from torch.testing._internal import common_distributed

    for name in ("skip_if_small_worldsize", "skip_if_odd_worldsize"):
        setattr(common_distributed, name, _open_as_for_mpi(getattr(common_distributed, name)))
    suite = importlib.import_module(SUITE_MODULE)
    references = [_load_copy(b) for b in GATE_BACKENDS]
    base = suite.DistributedTest._DistTestBase
    plan = []
    for name in sorted(n for n in dir(base) if n.startswith("test")):
        fn = getattr(base, name)
        entry = {"name": name, "run": True, "reason": "", "opened_by": ""}
        if getattr(fn, "__unittest_skip__", False):
            opened_by = [b for b, ref in zip(GATE_BACKENDS, references)
                         if not getattr(getattr(ref.DistributedTest._DistTestBase, name),
                                        "__unittest_skip__", False)]
            if opened_by:
                entry["opened_by"] = opened_by[0]
            else:
                entry.update(run=False, reason=_skip_reason(name, references))
        plan.append(entry)
    suite.BACKEND = GateName(backend)
    return suite, plan


# --------------------------------------------------------------------------------------
# Running one test on this rank


def _classify(exc: BaseException, skips: dict[int, str], failure: type) -> tuple[str, str]:
    if isinstance(exc, unittest.SkipTest):
        return "skipped", str(exc)
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code in skips:                   # torch's skip decorators exit with a skip code
            return "skipped", skips[code]
        if code == 0:
            return "passed", ""
        return "error", f"sys.exit({exc.code!r})\n" + traceback.format_exc()
    kind = "failed" if isinstance(exc, failure) else "error"
    return kind, traceback.format_exc()


def run_one(suite: Any, case_cls: type, name: str, rank: int, test_dir: Path,
            backend: Any) -> tuple[str, str]:
    """Torch's ``TestDistBackend._run`` + ``run_test`` for one method, on this rank."""
    import torch.distributed as dist
    from torch.testing._internal import common_utils
    from torch.testing._internal.common_distributed import TEST_SKIPS

    skips = {s.exit_code: s.message for s in TEST_SKIPS.values()}
    os.environ["TEMP_DIR"] = str(test_dir)
    suite.Barrier.barrier_id = 0
    suite.INIT_METHOD = "file://" + str(test_dir / "init_dir" / "shared_init_file")
    case = case_cls(name)
    case.rank = rank
    case.file_name = str(test_dir / "pg_init_file")
    try:
        timeout = timedelta(seconds=suite.CUSTOM_PG_TIMEOUT.get(name, suite.default_pg_timeout))
        dist.init_process_group(init_method=case.init_method, backend=backend,
                                world_size=int(case.world_size), rank=rank, timeout=timeout)
        case._barrier()
        common_utils.set_rng_seed()
        getattr(case, name)()
        return "passed", ""
    except (Exception, SystemExit) as exc:
        return _classify(exc, skips, case.failureException)


def _teardown() -> str:
    """Destroy every process group the test left; '' or the error's traceback."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
        return ""
    except Exception:
        return traceback.format_exc()


def _restore_environment(environment: dict[str, str]) -> None:
    """Undo a test's changes to os.environ. In torch's harness each test is a process of
    its own; here the ranks live on, and e.g. ``with_dist_debug_levels`` leaves
    TORCH_DISTRIBUTED_DEBUG at the last level it tried (DETAIL) for every later test."""
    import torch.distributed as dist

    if dict(os.environ) != environment:
        os.environ.clear()
        os.environ.update(environment)
        dist.set_debug_level_from_env()


def _agree(comm: Any, mine: str) -> str:
    """The worst outcome over the ranks, on the harness's communicator. A rank whose own
    test did not pass gives up after FAILED_RANK_GRACE_S and ends the job."""
    import numpy as np
    from mpi4py import MPI

    send, recv = np.array([OUTCOMES.index(mine)], np.int32), np.zeros(1, np.int32)
    request = comm.Iallreduce(send, recv, op=MPI.MAX)
    start, delay = time.monotonic(), 1e-4
    while not request.Test():
        if mine in ("failed", "error") and time.monotonic() - start > FAILED_RANK_GRACE_S:
            sys.stderr.write(f"[torch-suite rank {comm.Get_rank()}] the other ranks did not "
                             f"finish within {FAILED_RANK_GRACE_S:.0f}s of this rank's "
                             "failure: ending the job\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(3)
        time.sleep(delay)
        delay = min(2 * delay, 5e-3)
    return OUTCOMES[int(recv[0])]


def main() -> None:
    backend_name, job_dir, done_file, select = sys.argv[1], Path(sys.argv[2]), sys.argv[3], \
        json.loads(sys.argv[4])
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()            # the harness's own: see the module docstring
    rank, size = comm.Get_rank(), comm.Get_size()
    os.environ["WORLD_SIZE"] = str(size)
    os.environ["TORCH_SHOW_CPP_STACKTRACES"] = "1"
    # Opens torch's file:// gates (test_barrier_timeout_global); replaced per test.
    os.environ["INIT_METHOD"] = "file://" + str(job_dir / "init_file")
    os.environ["TEMP_DIR"] = str(job_dir)
    if backend_name == "commrt":
        import commrt  # noqa: F401  (registers the backend)
    import torch

    torch._C._set_print_stack_traces_on_fatal_signal(True)
    suite, plan = import_suite(backend_name)
    done = set(Path(done_file).read_text().split()) if done_file != "-" else set()
    todo = [(i, e) for i, e in enumerate(plan)
            if e["run"] and e["name"] not in done and selected(e["name"], select)]
    if rank == 0:
        (job_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        for sub in ("outcome", "started"):
            (job_dir / sub).mkdir(exist_ok=True)
        for i, _entry in todo:
            for d in ("barrier", "test_dir", "init_dir"):
                (job_dir / "t" / f"{i:04d}" / d).mkdir(parents=True, exist_ok=True)
    comm.Barrier()

    class Case(suite.TestDistBackend, suite.DistributedTest._DistTestBase):
        """torch's TestDistBackendWithSpawn, run in place on this rank."""

    backend = suite.BACKEND
    stacks = open(stacks_path(job_dir, rank), "a")
    for i, entry in todo:
        name = entry["name"]
        limit = test_limit_s(name)
        stacks.write(f"== {name} (rank {rank}, watchdog {limit:.0f}s)\n")
        stacks.flush()
        start_path(job_dir, i, rank).write_text(name)
        faulthandler.dump_traceback_later(limit, exit=True, file=stacks)
        began, environment = time.monotonic(), dict(os.environ)
        outcome, detail = run_one(suite, Case, name, rank, job_dir / "t" / f"{i:04d}", backend)
        record = {"test": name, "rank": rank, "outcome": outcome, "detail": detail,
                  "seconds": round(time.monotonic() - began, 3)}
        outcome_path(job_dir, i, rank).write_text(json.dumps(record))
        agreed = _agree(comm, outcome)
        # Torch destroys the group after a barrier of every rank; the agreement is that.
        teardown_error = _teardown()
        _restore_environment(environment)
        if teardown_error:
            record.update(outcome="error", detail=detail + "\ndestroying the process group "
                          "after the test:\n" + teardown_error)
            outcome_path(job_dir, i, rank).write_text(json.dumps(record))
        agreed = max(agreed, _agree(comm, record["outcome"]), key=OUTCOMES.index)
        faulthandler.cancel_dump_traceback_later()
        if rank == 0:
            with open(job_dir / "results.jsonl", "a") as out:
                out.write(json.dumps({"index": i, "test": name, "outcome": agreed}) + "\n")
        if agreed in ("failed", "error") or name in ENDS_JOB:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Barrier()
    # Not MPI_Finalize: a test may have left operations posted that would never finish.
    os._exit(0)


if __name__ == "__main__":
    main()
