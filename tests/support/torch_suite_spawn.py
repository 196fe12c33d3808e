"""PyTorch's own spawn-based distributed harness (``TestDistBackend``) on commrt, no mpirun.

    python tests/support/torch_suite_spawn.py [-k SUBSTRING ...] [--backend commrt|gloo]

This is how torch runs ``DistributedTest._DistTestBase`` itself (its
``test_distributed_spawn.py``): for every test, ``TestDistBackend`` spawns WORLD_SIZE (3)
fresh processes with torch.multiprocessing, and each calls ``init_process_group(backend,
init_method=file://..., rank=r, world_size=3)``, runs the method, and exits; torch's
harness times each test out. On commrt no MPI launcher is present, so every test forms a
new MPI world through commrt's PMI server (commrt.transports.pmi).

Gates are opened exactly as in the mpirun harness (`worker_torch_suite.import_suite`;
here a test torch marks skipped for commrt but runs for gloo or mpi is given an unmarked
method), so the outcomes compare with the mpirun harness's expected list
(``tests/support/torch_suite_expected_BACKEND.txt``): the run prints each test's outcome, and
every test whose outcome differs from that list, and exits non-zero if any does.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["WORLD_SIZE"] = "3"
os.environ.setdefault("COMMRT_SUITE_BACKEND", "commrt")

import torch_suite as S  # noqa: E402
import worker_torch_suite as W  # noqa: E402

# Imported again in every spawned process (as __mp_main__): each opens the same gates.
suite, PLAN = W.import_suite(os.environ["COMMRT_SUITE_BACKEND"])


class TestDistBackendWithSpawn(suite.TestDistBackend, suite.DistributedTest._DistTestBase):
    def setUp(self) -> None:
        super().setUp()
        self._spawn_processes()


def _unmarked(fn):
    """`fn` without torch's skip mark (a gate opened for gloo or mpi)."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    run.__dict__.pop("__unittest_skip__", None)
    run.__dict__.pop("__unittest_skip_why__", None)
    return run


for _entry in PLAN:
    if _entry["run"] and _entry["opened_by"]:
        setattr(TestDistBackendWithSpawn, _entry["name"],
                _unmarked(getattr(suite.DistributedTest._DistTestBase, _entry["name"])))


class _Outcomes(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, tuple[str, str]] = {}

    def addSuccess(self, test) -> None:
        self.outcomes[test._testMethodName] = ("passed", "")

    def addSkip(self, test, reason) -> None:
        self.outcomes[test._testMethodName] = ("skipped", reason)

    def addFailure(self, test, err) -> None:
        self.outcomes[test._testMethodName] = ("failed", self._exc_info_to_string(err, test))

    def addError(self, test, err) -> None:
        self.outcomes[test._testMethodName] = ("error", self._exc_info_to_string(err, test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", action="append", default=[],
                        help="run only tests whose names contain this (repeatable)")
    args = parser.parse_args(argv)
    backend = os.environ["COMMRT_SUITE_BACKEND"]
    expected = S.read_expected(S.expected_path(backend)).outcomes
    names = [e["name"] for e in PLAN if e["run"] and W.selected(e["name"], args.select)
             and expected.get(e["name"], ("",))[0] != "excluded"]
    result = _Outcomes()
    started = time.monotonic()
    for name in names:
        TestDistBackendWithSpawn(name).run(result)
        got, detail = result.outcomes.get(name, ("error", "no outcome recorded"))
        print(f"{name}: {got}", flush=True)
    outcomes = result.outcomes
    counts = {o: sum(v[0] == o for v in outcomes.values())
              for o in ("passed", "skipped", "failed", "error")}
    print(f"torch suite on {backend}, spawned ranks (TestDistBackend, 3 ranks): "
          + ", ".join(f"{n} {o}" for o, n in counts.items())
          + f" in {time.monotonic() - started:.0f} s", flush=True)
    differs = []
    for name in names:
        got, detail = outcomes.get(name, ("error", "no outcome recorded"))
        want = expected.get(name, ("passed", ""))[0]
        if got != want:
            differs.append(f"DIFFERS {name}: {got} here, {want} under mpirun\n"
                           + S._indent(detail))
    print("\n".join(differs) or "every outcome as under mpirun", flush=True)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
