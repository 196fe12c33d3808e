"""Run a test function on N MPI ranks from inside pytest.

A multi-rank test is two functions in the same test file: a *worker* (module level,
runs on every rank, raises on failure) and the pytest test that launches it::

    def _allreduce_worker(n: int) -> None:          # runs on every rank
        ...

    @pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5])
    def test_coll_allreduce(nprocs):
        run_ranks(_allreduce_worker, nprocs, n=1000)

`run_ranks` starts ``mpirun -n N python tests/support/_mpi_worker.py FILE FUNCTION KWARGS`` in its
own process session. An exception on any rank aborts the whole job (the worker installs
commrt's abort-on-error hook), and a job that outlives ``timeout`` seconds is killed with
its process group: either way the test fails with every rank's output in the message.
A hang is a failing test, never a passing one. `run_ranks_status` returns the launcher's
exit status and the output instead, for a job that is meant to fail (a timeout test).

Launching costs a few seconds per job (each rank imports torch), so a worker checks
everything one concept needs in one launch rather than one launch per assertion.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commrt.transports import mpirun_executable

WORKER = Path(__file__).with_name("_mpi_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]




def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a test job: quiet, oversubscription-friendly, repository importable."""
    env = dict(os.environ)
    # Tests oversubscribe a 2-core machine: waiting ranks must yield the CPU instead of spinning.
    env.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_ranks(fn: Callable[..., Any], nprocs: int, *, timeout: float = 180.0,
              env: dict[str, str] | None = None, **kwargs: Any) -> str:
    """Run module-level function `fn(**kwargs)` on `nprocs` MPI ranks; return the output.

    kwargs must be JSON-serialisable. Fails (AssertionError) if any rank fails, the job
    times out, or the launcher exits non-zero.
    """
    code, out = run_ranks_status(fn, nprocs, timeout=timeout, env=env, **kwargs)
    if code != 0:
        raise AssertionError(
            f"{fn.__name__} on {nprocs} ranks failed (exit {code}); output:\n{out[-8000:]}")
    return out


def run_ranks_status(fn: Callable[..., Any], nprocs: int, *, timeout: float = 180.0,
                     env: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str]:
    """`run_ranks` for a job that is expected to fail: return (the launcher's exit status,
    the output). A job that outlives `timeout` still fails the test (AssertionError)."""
    module_file = Path(sys.modules[fn.__module__].__file__).resolve()
    cmd = [mpirun_executable(), "-n", str(nprocs), sys.executable, str(WORKER),
           str(module_file), fn.__name__, json.dumps(kwargs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=mpi_env(env), cwd=str(REPO_ROOT), start_new_session=True,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"{fn.__name__} on {nprocs} ranks timed out after {timeout:.0f}s (a hang is a "
            f"failure); output:\n{out[-8000:]}") from None
    return proc.returncode, out


# -- one launch, many named checks --------------------------------------------------------
# A worker that runs several independent checks in one launch reports each of them on its
# own: every rank prints ``CHECK <name> rank <r> OK;`` or ``... FAIL <message>;``, and one
# pytest test per check reads its lines from the launch's output.


def run_checks(checks: dict[str, Callable[[Any], None]]) -> None:
    """Worker side: run ``check(comm)`` for each named check on this rank (a failed
    assertion does not stop the others), print its CHECK line (rank 0 also a TIME line),
    and raise AssertionError at the end if any failed."""
    import time

    from commrt import transports as T

    comm = T.world()
    failed = []
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            check(comm)
            status = "OK"
        except AssertionError as exc:
            status = f"FAIL {exc}"
            failed.append(name)
        if comm.rank == 0:
            print(f"TIME {name} {time.perf_counter() - start:.1f} s;", flush=True)
        print(f"CHECK {name} rank {comm.rank} {status};", flush=True)
    if failed:
        raise AssertionError(f"rank {comm.rank}: failed {failed}")


def checks_fixture(fn: Callable[[], None], world_sizes: list[int], *, timeout: float):
    """pytest side: a module-scoped fixture, one launch of worker ``fn`` (module level,
    calling :func:`run_checks`) per world size, giving ``(nprocs, output)`` for
    :func:`assert_check`; the output is kept even when the job fails (the CHECK lines say
    which checks did). In the test module: ``launch = checks_fixture(_worker, SIZES, ...)``."""
    import pytest

    @pytest.fixture(scope="module", params=world_sizes)
    def launch(request):
        try:
            out = run_ranks(fn, request.param, timeout=timeout)
        except AssertionError as exc:
            out = str(exc)
        return request.param, out
    return launch


def assert_check(launch: tuple[int, str], name: str) -> None:
    """AssertionError unless every rank of ``launch`` printed ``CHECK <name> rank <r> OK``."""
    import re

    nprocs, out = launch
    # ranks' lines may interleave in mpirun's output: match the tokens, not whole lines
    ok = set(re.findall(rf"CHECK {name} rank (\d+) OK;", out))
    failures = re.findall(rf"CHECK {name} rank \d+ FAIL[^;]*", out)
    assert len(ok) == nprocs, f"{name} on {nprocs} ranks:\n" + "\n".join(failures) + \
        "\n--- output tail ---\n" + out[-6000:]
