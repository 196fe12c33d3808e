"""The shared test harness: run a function on N MPI ranks from inside pytest, report each
per-rank check as its own pytest test, and seed random inputs so a failure names its seed.

**A multi-rank test** is two functions in the same test file: a *worker* (module level,
runs on every rank, raises on failure) and the pytest test that launches it::

    def _allreduce_worker(seed: int, n: int) -> None:     # runs on every rank
        x = torch.randn(n, generator=generator(seed, "allreduce", rank))
        ...

    @pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5])
    def test_coll_allreduce(nprocs, seed):                # `seed`: tests/conftest.py
        run_ranks(_allreduce_worker, nprocs, seed=seed, n=1000)

`run_ranks` starts ``mpirun -n N python tests/support/worker_mpi.py FILE FUNCTION KWARGS``
in its own process session. An exception on any rank aborts the whole job (the worker
installs commrt's abort-on-error hook), and a job that outlives ``timeout`` seconds is
killed with its process group: either way the test fails with every rank's output (and
the job's seed) in the message. A hang is a failing test, never a passing one.
`run_ranks_status` returns the launcher's exit status and the output instead, for a job
that is meant to fail (a timeout test).

**One launch, many checks.** Launching costs a few seconds per job (each rank imports
torch), so a file runs one launch per world size and many named checks in it: the worker
calls :func:`run_checks`, every rank prints ``CHECK <name> rank <r> OK;`` or ``... FAIL
<message>;`` per check, and :func:`checks_fixture` / :func:`assert_check` turn each check
into its own pytest test::

    CHECKS = {"sum": _check_sum, "max": _check_max}          # check(comm, seed)

    def _worker(seed: int) -> None:
        comm = T.world()
        run_checks(CHECKS, comm, seed, rank=comm.rank)

    launch = checks_fixture(_worker, [2, 3], timeout=120)   # one launch per world size

    @pytest.mark.parametrize("check", CHECKS)
    def test_transport_reduction(launch, check):
        assert_check(launch, check)

**Seeds.** Random inputs are fresh on every run and reproducible from one integer:
:func:`fresh_seed` draws it on the pytest side (``COMMRT_TEST_SEED=N`` replays a run),
:func:`generator` turns it plus the case's keys (names, ranks, sizes) into a
``torch.Generator``. Every rank can rebuild every other rank's input from the seed, which
is how workers compute an independent single-process reference.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commrt.transports import mpirun_executable

__all__ = ["REPO_ROOT", "SEED_ENV", "Launch", "assert_check", "checks_fixture", "finish_job",
           "fresh_seed", "gather_rows", "generator", "launcher_free_env", "mpi_env",
           "mpirun_executable", "run_checks", "run_ranks", "run_ranks_status", "start_job"]

WORKER = Path(__file__).with_name("worker_mpi.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_ENV = "COMMRT_TEST_SEED"


# -- seeds ----------------------------------------------------------------------------------


def fresh_seed() -> int:
    """A new random seed for one test or launch; ``COMMRT_TEST_SEED=N`` fixes it (to replay
    the failure whose message said ``seed=N``)."""
    fixed = os.environ.get(SEED_ENV)
    return int(fixed) if fixed else random.randrange(1 << 30)


def generator(seed: int, *keys: Any) -> Any:
    """A ``torch.Generator`` determined by ``seed`` and the JSON-serialisable keys naming
    one input (case name, rank, sizes, ...): the same on every rank and in every process,
    different per key."""
    import torch

    mixed = zlib.crc32(json.dumps([seed, *keys]).encode())
    return torch.Generator().manual_seed(seed * 1_000_003 + mixed)


def gather_rows(comm: Any, t: Any) -> Any:
    """Worker side: every rank's tensor `t` flattened, stacked (P, n) in float64, through
    the transport's all-gather (counted under the "test" kind): each rank gets the inputs
    it needs for a single-process reference."""
    import torch

    t = t.reshape(-1).to(torch.float64)
    out = torch.empty(comm.size * t.numel(), dtype=torch.float64)
    comm.iallgather(t, out, kind="test").wait()
    return out.view(comm.size, -1)


def _seed_note(seed: int | None) -> str:
    return "" if seed is None else f" seed={seed} (replay: {SEED_ENV}={seed})"


# -- launching ------------------------------------------------------------------------------


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


# What mpirun/mpiexec (mpich's hydra, Open MPI, PMIx) export to its ranks.
_LAUNCHER_PREFIXES = ("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "HYDRA_")


def launcher_free_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """`mpi_env` without any MPI launcher's variables: for processes no mpirun started
    (torchrun, torch.multiprocessing), even when pytest itself runs under one."""
    env = {k: v for k, v in mpi_env().items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(extra or {})
    return env


def run_ranks(fn: Callable[..., Any], nprocs: int, *, timeout: float = 180.0,
              env: dict[str, str] | None = None, **kwargs: Any) -> str:
    """Run module-level function `fn(**kwargs)` on `nprocs` MPI ranks; return the output.

    kwargs must be JSON-serialisable. Fails (AssertionError, naming ``seed=`` when kwargs
    has one) if any rank fails, the job times out, or the launcher exits non-zero.
    """
    code, out = run_ranks_status(fn, nprocs, timeout=timeout, env=env, **kwargs)
    if code != 0:
        raise AssertionError(
            f"{fn.__name__} on {nprocs} ranks failed (exit {code}){_seed_note(kwargs.get('seed'))};"
            f" output:\n{out[-8000:]}")
    return out


def run_ranks_status(fn: Callable[..., Any], nprocs: int, *, timeout: float = 180.0,
                     env: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str]:
    """`run_ranks` for a job that is expected to fail: return (the launcher's exit status,
    the output). A job that outlives `timeout` still fails the test (AssertionError)."""
    module_file = Path(sys.modules[fn.__module__].__file__).resolve()
    cmd = [mpirun_executable(), "-n", str(nprocs), sys.executable, str(WORKER),
           str(module_file), fn.__name__, json.dumps(kwargs)]
    return finish_job(start_job(cmd, mpi_env(env)), timeout,
                      f"{fn.__name__} on {nprocs} ranks{_seed_note(kwargs.get('seed'))}")


def start_job(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a job (mpirun, torchrun, a script) from the repository root in its own process
    group, so that `finish_job` can kill all of it; stdout and stderr together."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=str(REPO_ROOT), start_new_session=True, text=True)


def finish_job(proc: subprocess.Popen, timeout: float, what: str) -> tuple[int, str]:
    """Wait for a `start_job` job: (exit status, output). A job that outlives `timeout` is
    killed with its whole process group and fails the test (a hang is a failure)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout:.0f}s (a hang is a failure);"
                             f" output:\n{out[-8000:]}") from None
    return proc.returncode, out


# -- one launch, many named checks ----------------------------------------------------------


def run_checks(checks: Mapping[str, Callable[..., None]], *args: Any, rank: int) -> None:
    """Worker side: call ``check(*args)`` for each named check on this rank, in order (a
    failed assertion does not stop the others), print its CHECK line (rank 0 also a TIME
    line), and raise AssertionError at the end if any failed.

    A failed assertion (``assert``, or ``pytest.raises``/``pytest.fail`` in the check)
    fails the check only. Another exception is printed as the check's failure and then
    aborts the job (the ranks may no longer be in step): the checks after it print no
    line and fail too."""
    import pytest

    failed = []
    for name, check in checks.items():
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            check(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pytest.fail's exception is not an Exception
            error = exc
        status = "OK" if error is None else "FAIL " + (
            # one line per check, ended by ";": the pytest side finds it by its tokens
            f"{type(error).__name__}: {error}".replace(";", ","))
        if rank == 0:
            print(f"TIME {name} {time.perf_counter() - start:.1f} s;", flush=True)
        print(f"CHECK {name} rank {rank} {status};", flush=True)
        if error is not None:
            if not isinstance(error, (AssertionError, pytest.fail.Exception)):
                raise error
            failed.append(name)
    if failed:
        raise AssertionError(f"rank {rank}: failed {failed}")


@dataclass(frozen=True)
class Launch:
    """One launch of a checks worker: its world size, seed and whole output."""

    nprocs: int
    seed: int
    output: str = field(repr=False)


def checks_fixture(fn: Callable[..., None], world_sizes: list[int], *, timeout: float,
                   variants: Mapping[str, dict[str, str]] | None = None):
    """pytest side: a module-scoped fixture giving a :class:`Launch` of worker ``fn``
    (module level, called as ``fn(seed=N)``, calling :func:`run_checks`) per world size,
    and per variant when ``variants`` maps ids to extra environment variables; the seed is
    fresh per launch. The output is kept even when the job fails (the CHECK lines say
    which checks did). In the test module: ``launch = checks_fixture(_worker, SIZES, ...)``."""
    import pytest

    params = list(world_sizes) if variants is None else [
        (n, name) for n in world_sizes for name in variants]

    @pytest.fixture(scope="module", params=params,
                    ids=None if variants is None else [f"{n}-{v}" for n, v in params])
    def launch(request) -> Launch:
        nprocs, env = (request.param, None) if variants is None else (
            request.param[0], variants[request.param[1]])
        seed = fresh_seed()
        try:
            out = run_ranks(fn, nprocs, timeout=timeout, env=env, seed=seed)
        except AssertionError as exc:
            out = str(exc)
        return Launch(nprocs, seed, out)
    return launch


def assert_check(launch: Launch, name: str) -> None:
    """AssertionError (naming the launch's seed) unless every rank of ``launch`` printed
    ``CHECK <name> rank <r> OK``."""
    # ranks' lines may interleave in mpirun's output: match the tokens, not whole lines
    ok = set(re.findall(rf"CHECK {re.escape(name)} rank (\d+) OK;", launch.output))
    failures = re.findall(rf"CHECK {re.escape(name)} rank \d+ FAIL[^;]*", launch.output)
    assert len(ok) == launch.nprocs, (
        f"{name} on {launch.nprocs} ranks,{_seed_note(launch.seed)}:\n" + "\n".join(failures)
        + "\n--- output tail ---\n" + launch.output[-6000:])
