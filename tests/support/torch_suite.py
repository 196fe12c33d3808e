"""PyTorch's own distributed test suite (``DistributedTest._DistTestBase``) on a backend.

`run_suite` runs every test method of the installed torch's
``torch/testing/_internal/distributed/distributed_test.py`` on ``mpirun -n 3`` ranks (see
`worker_torch_suite` for how a rank runs a test, opens torch's CPU gates for commrt,
and agrees on its outcome); `check` compares the agreed outcomes with an
expected-outcomes file. Used by ``tests/backend/test_backend_torch_suite.py``, and by hand::

    python tests/support/torch_suite.py                      # commrt, compared with its list
    python tests/support/torch_suite.py --backend gloo       # the same harness on gloo
    python tests/support/torch_suite.py -k all_gather -k barrier   # only tests whose names match
    python tests/support/torch_suite.py --print-expected     # the observed outcomes as list lines

Hangs and crashes. A rank whose test outlives its watchdog (`worker_torch_suite.
test_limit_s`) dumps its stacks and ends the job; a rank that dies ends it too. The
runner then records that test as ``hang`` (naming the ranks that did not finish, with
their stacks) and starts a new job for the tests left, so one hang costs one test, not
the run. A job also ends after a test that failed (its communicators may hold unmatched
operations), so a failure cannot spill into the next test either.

Expected-outcomes file (``tests/support/torch_suite_expected_BACKEND.txt``): ``min_passed N``,
then one line per test that is not expected to pass: its name, its expected outcome
(skipped, failed, error or hang; or excluded: not run at all, for a test of a feature
the backend does not have) and the reason, which is required. `check` fails on a
test that does worse than listed (an unlisted test that does not pass, a listed test
with another non-pass outcome), on fewer than N passes in a full run, and on list
entries that name no test of the suite; a listed test that now passes is reported, not
failed (remove it from the list).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import worker_torch_suite as W  # noqa: E402
from harness import mpi_env  # noqa: E402

from commrt.transports import mpirun_executable  # noqa: E402

WORKER = HERE / "worker_torch_suite.py"
BACKENDS = ("commrt", "gloo")
NON_PASS = ("excluded", "skipped", "failed", "error", "hang")
STARTUP_LIMIT_S = 300.0       # a job's imports, before its first test starts
BACKSTOP_S = 60.0             # after a test's watchdog should have fired


def expected_path(backend: str) -> Path:
    return HERE / f"torch_suite_expected_{backend}.txt"


@dataclasses.dataclass
class Outcome:
    """One test's agreed outcome: passed, skipped, failed, error or hang; `detail` is the
    skip reason, or each failing rank's traceback (and the stacks of ranks that hung)."""

    outcome: str
    detail: str = ""
    opened_by: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class SuiteRun:
    backend: str
    nprocs: int
    outcomes: dict[str, Outcome]        # every test of the suite, in torch's order
    jobs: int
    seconds: float
    work_dir: Path
    selected: bool                      # only some tests were run (-k)

    def count(self, outcome: str) -> int:
        return sum(o.outcome == outcome for o in self.outcomes.values())

    def summary(self) -> str:
        opened = sum(bool(o.opened_by) for o in self.outcomes.values())
        return (f"torch suite on {self.backend} ({self.nprocs} ranks): "
                f"{self.count('passed')} passed, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed, {self.count('error')} errors, "
                f"{self.count('hang')} hangs in {self.seconds:.0f} s ({self.jobs} jobs; "
                f"{opened} tests run through gates torch opens for gloo/mpi only)")


# --------------------------------------------------------------------------------------
# Running


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stack_section(job_dir: Path, rank: int, test: str) -> str:
    """What rank `rank`'s watchdog wrote for `test` (empty if it did not fire)."""
    try:
        text = W.stacks_path(job_dir, rank).read_text(errors="replace")
    except OSError:
        return ""
    marker = f"== {test} (rank {rank},"
    start = text.rfind(marker)
    if start < 0:
        return ""
    section = text[start:].split("\n", 1)[1] if "\n" in text[start:] else ""
    return section.split("\n== ", 1)[0].strip()


def _rank_outcomes(job_dir: Path, index: int, nprocs: int) -> dict[int, dict | None]:
    return {r: _read_json(W.outcome_path(job_dir, index, r)) for r in range(nprocs)}


def _describe(ranks: dict[int, dict | None], job_dir: Path, test: str) -> str:
    lines = []
    for rank, rec in ranks.items():
        if rec is None:
            stacks = _stack_section(job_dir, rank, test)
            lines.append(f"rank {rank}: did not finish" + (
                f"; its watchdog's stacks:\n{stacks}" if stacks else
                " (no watchdog stacks: killed, or died)"))
        elif rec["outcome"] in ("failed", "error"):
            lines.append(f"rank {rank}: {rec['outcome']}:\n{rec['detail'].rstrip()}")
        elif rec["outcome"] == "skipped":
            lines.append(f"rank {rank}: skipped: {rec['detail']}")
    return "\n".join(lines)


def _agreed_record(job_dir: Path, index: int, test: str, agreed: str,
                   nprocs: int) -> Outcome:
    ranks = _rank_outcomes(job_dir, index, nprocs)
    seconds = max((r["seconds"] for r in ranks.values() if r), default=0.0)
    if agreed == "skipped":
        reasons = sorted({r["detail"] for r in ranks.values()
                          if r and r["outcome"] == "skipped"})
        return Outcome("skipped", "; ".join(reasons), seconds=seconds)
    detail = _describe(ranks, job_dir, test) + f"\n(the job's output: {job_dir}/job.log)" \
        if agreed != "passed" else ""
    return Outcome(agreed, detail, seconds=seconds)


def _interrupted_record(job_dir: Path, index: int, test: str, nprocs: int,
                        rc: int | None) -> Outcome:
    """The outcome of the test a job died in: failed/error if a rank reported that
    (the others then hung in a collective it never joined), else hang."""
    ranks = _rank_outcomes(job_dir, index, nprocs)
    worst = max((r["outcome"] for r in ranks.values() if r),
                key=W.OUTCOMES.index, default="passed")
    outcome = worst if worst in ("failed", "error") else "hang"
    how = "killed by the runner's backstop" if rc is None else f"launcher exit {rc}"
    detail = (f"the job ended during this test ({how}); "
              f"finished: {[r for r, rec in ranks.items() if rec]}\n"
              + _describe(ranks, job_dir, test) + f"\n(the job's output: {job_dir}/job.log)")
    return Outcome(outcome, detail)


def _running_test(job_dir: Path) -> tuple[int, str, float] | None:
    """(index, name, start time) of the test the job is in: started by some rank, with no
    agreed result yet (tests run in index order, so the highest such index)."""
    started = list((job_dir / "started").glob("*")) if (job_dir / "started").exists() else []
    done = {rec["index"] for rec in _results(job_dir)}
    pending: dict[int, list[Path]] = {}
    for path in started:
        index = int(path.name.split("_")[0])
        if index not in done:
            pending.setdefault(index, []).append(path)
    if not pending:
        return None
    index = max(pending)
    paths = pending[index]
    return index, paths[0].read_text(), min(p.stat().st_mtime for p in paths)


def _results(job_dir: Path) -> list[dict]:
    path = job_dir / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_job(job_dir: Path, cmd: list[str], env: dict[str, str]) -> int | None:
    """Run one mpirun job to its end; None if the backstop had to kill it (its watchdog
    did not end it in time)."""
    with open(job_dir / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(HERE.parents[1]), start_new_session=True)
        launched = time.time()
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            running = _running_test(job_dir)
            if running is None:     # importing, or between two tests
                results = job_dir / "results.jsonl"
                deadline = (results.stat().st_mtime if results.exists() else launched) \
                    + STARTUP_LIMIT_S
            else:
                deadline = running[2] + W.test_limit_s(running[1]) + BACKSTOP_S
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None


def run_suite(backend: str = "commrt", *, nprocs: int = W.WORLD_SIZE_FOR_SUITE,
              select: Sequence[str] = (), exclude: dict[str, str] | None = None,
              work_dir: Path | None = None, log: Callable[[str], None] = print) -> SuiteRun:
    """Run the suite on `backend`; `select`: substrings, run only tests whose names
    contain one of them; `exclude`: tests not to run (recorded as skipped), with why.
    Returns every test's agreed outcome."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if importlib.util.find_spec("expecttest") is None:
        raise RuntimeError("torch's test utilities (torch.testing._internal) need the "
                           "expecttest package: pip install expecttest (the dev extra)")
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix=f"torch-suite-{backend}-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    plan: list[dict] | None = None
    outcomes = {name: Outcome("skipped", f"excluded by the expected list: {why}")
                for name, why in (exclude or {}).items()}
    chosen: list[str] = []
    env = mpi_env()
    jobs = 0
    while True:
        job_dir = work_dir / f"job{jobs}"
        job_dir.mkdir()
        (job_dir / "done.txt").write_text("\n".join(outcomes))
        cmd = [mpirun_executable(), "-n", str(nprocs), sys.executable, str(WORKER), backend,
               str(job_dir), str(job_dir / "done.txt"), json.dumps(list(select))]
        rc = _run_job(job_dir, cmd, env)
        jobs += 1
        if plan is None:
            plan = _read_json(job_dir / "plan.json")
            if plan is None:
                raise RuntimeError(f"the first torch-suite job ended (exit {rc}) before "
                                   f"planning; its output:\n{_tail(job_dir / 'job.log')}")
            chosen = [e["name"] for e in plan if e["run"] and W.selected(e["name"], select)]
            log(f"torch suite on {backend}: {len(plan)} tests, {len(chosen)} to run "
                f"({sum(bool(e['opened_by']) for e in plan)} through gates opened for "
                f"gloo/mpi), {nprocs} ranks, work dir {work_dir}")
        new = []
        for rec in _results(job_dir):
            outcomes[rec["test"]] = _agreed_record(job_dir, rec["index"], rec["test"],
                                                   rec["outcome"], nprocs)
            new.append(rec["test"])
        running = _running_test(job_dir)
        if running is not None:
            index, name, _ = running
            outcomes[name] = _interrupted_record(job_dir, index, name, nprocs, rc)
            new.append(name)
        for name in new:
            if outcomes[name].outcome not in ("passed", "skipped"):
                log(f"  {name}: {outcomes[name].outcome}")
        if all(n in outcomes for n in chosen):
            break
        if not new:
            raise RuntimeError(f"torch-suite job {jobs - 1} ended (exit {rc}) without "
                               f"finishing a test; its output:\n{_tail(job_dir / 'job.log')}")
    for entry in plan:
        name = entry["name"]
        if name in outcomes:
            outcomes[name].opened_by = entry["opened_by"]
        elif not entry["run"]:
            outcomes[name] = Outcome("skipped", entry["reason"] or "(torch gives no reason)")
    ordered = {e["name"]: outcomes[e["name"]] for e in plan if e["name"] in outcomes}
    return SuiteRun(backend, nprocs, ordered, jobs, time.time() - began, work_dir,
                    bool(select))


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(line for line in text[-chars:].splitlines() if "USDT:" not in line)


# --------------------------------------------------------------------------------------
# Expected outcomes


@dataclasses.dataclass
class Expected:
    min_passed: int
    outcomes: dict[str, tuple[str, str]]       # test -> (outcome, reason)


def read_expected(path: Path) -> Expected:
    """Parse an expected-outcomes file (format: the module docstring)."""
    min_passed, outcomes = None, {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if fields[0] == "min_passed" and len(fields) == 2:
            min_passed = int(fields[1])
            continue
        if len(fields) < 3 or fields[1] not in NON_PASS:
            raise ValueError(f"{path}:{number}: expected 'TEST OUTCOME REASON' with OUTCOME "
                             f"one of {NON_PASS} and a reason, got {raw!r}")
        if fields[0] in outcomes:
            raise ValueError(f"{path}:{number}: {fields[0]} is listed twice")
        outcomes[fields[0]] = (fields[1], fields[2].strip())
    if min_passed is None:
        raise ValueError(f"{path}: no 'min_passed N' line")
    return Expected(min_passed, outcomes)


def excluded(expected: Expected | None) -> dict[str, str]:
    """The tests the list says not to run, with why."""
    listed = expected.outcomes if expected else {}
    return {name: reason for name, (outcome, reason) in listed.items() if outcome == "excluded"}


def check(run: SuiteRun, expected: Expected) -> tuple[list[str], list[str]]:
    """(problems, notes): problems fail the run; notes are improvements to record."""
    problems, notes = [], []
    for name in expected.outcomes:
        if name not in run.outcomes and not run.selected:
            problems.append(f"{name}: listed as expected but the suite has no such test")
    for name, got in run.outcomes.items():
        want, reason = expected.outcomes.get(name, ("passed", ""))
        if got.outcome == want or (want, got.outcome) == ("excluded", "skipped"):
            continue
        if got.outcome == "passed":
            notes.append(f"{name}: passes now (listed as {want}: {reason}); remove it "
                         "from the expected list")
        else:
            problems.append(f"{name}: {got.outcome}, expected {want}"
                            + (f" ({reason})" if reason else "") + f"\n{_indent(got.detail)}")
    if not run.selected and run.count("passed") < expected.min_passed:
        problems.append(f"{run.count('passed')} tests passed, expected at least "
                        f"{expected.min_passed} (min_passed)")
    return problems, notes


def _indent(text: str, limit: int = 60) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > limit:
        lines = lines[:limit // 2] + [f"... ({len(lines) - limit} lines) ..."] + \
            lines[-limit // 2:]
    return "\n".join("    " + line for line in lines)


def expected_lines(run: SuiteRun, previous: Expected | None) -> str:
    """The run's non-pass outcomes as expected-file lines, keeping listed reasons."""
    lines = [f"min_passed {run.count('passed')}"]
    listed = previous.outcomes if previous else {}
    for name, got in run.outcomes.items():
        if got.outcome == "passed":
            continue
        outcome, reason = listed.get(name, ("", ""))
        if (outcome, got.outcome) not in ((got.outcome, got.outcome), ("excluded", "skipped")):
            outcome, reason = got.outcome, (got.detail.splitlines() or ["<write the reason>"])[0]
        lines.append(f"{name:<60} {outcome:<8} {reason.strip()}")
    return "\n".join(lines) + "\n"


def report(run: SuiteRun, problems: list[str], notes: list[str]) -> str:
    text = [run.summary()]
    text += [f"NOTE {n}" for n in notes]
    text += [f"PROBLEM {p}" for p in problems]
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="commrt")
    parser.add_argument("--nprocs", type=int, default=W.WORLD_SIZE_FOR_SUITE)
    parser.add_argument("-k", dest="select", action="append", default=[],
                        help="run only tests whose names contain this (repeatable)")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--print-expected", action="store_true",
                        help="print the observed outcomes as expected-list lines")
    args = parser.parse_args(argv)
    path = expected_path(args.backend)
    expected = read_expected(path) if path.exists() else None
    run = run_suite(args.backend, nprocs=args.nprocs, select=args.select,
                    exclude=excluded(expected), work_dir=args.work_dir)
    problems, notes = check(run, expected) if expected else ([], [])
    print(report(run, problems, notes))
    if args.print_expected:
        print(expected_lines(run, expected), end="")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
