"""Launch benchmark jobs: ``mpirun -n N python -m MODULE`` from the repository root, over a
link of :mod:`perf.infra.netem`, with the environment every benchmark rank gets; and where
results go.

    from perf.infra.launch import launch_mpi
    proc = launch_mpi(4, "perf.bench.sparse", ["--json", "out.json"], link="1gbit", timeout=600)

``REPO_ROOT`` is the checkout the suite runs from (jobs start there, with it on PYTHONPATH);
``RESULTS_DIR`` (``results/`` at the top of the checkout) holds committed and default results.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from commrt.transports import mpirun_executable
from perf.infra.netem import emulated_link
from perf.infra.profile import wrap_command

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results"


def dated_results_dir() -> Path:
    """``results/<date>-<host>``: the default home of one day's runs on this machine."""
    host = socket.gethostname().split(".")[0] or "host"
    return RESULTS_DIR / f"{_dt.date.today().isoformat()}-{host}"


def job_env(nprocs: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for benchmark ranks: repository importable, one thread per rank.

    When ranks (plus the machine's current load) outnumber cores, waiting ranks must yield
    the CPU instead of spinning (MPIR_CVAR_CH4_PROGRESS_THROTTLE), otherwise a spinning rank
    starves the one it waits for. On an idle machine with a core per rank they spin (lowest
    latency).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if nprocs + os.getloadavg()[0] > (os.cpu_count() or 1):
        env.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")
    if extra:
        env.update(extra)
    return env


def _unique_dir(root: Path, name: str) -> Path:
    path, k = root / name, 1
    while path.exists():
        k += 1
        path = root / f"{name}-{k}"
    return path


def launch_mpi(nprocs: int, module: str, args: Sequence[str] = (), *, link: str = "shm",
               timeout: float = 600.0, ranks_per_node: int | None = None,
               env: dict[str, str] | None = None, python_args: Sequence[str] = (),
               wrap: Sequence[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    """Run `mpirun -n nprocs python -m module args` from the repository root over `link`.

    Returns the CompletedProcess (stdout and stderr captured, text). Raises
    LinkUnavailable if a shaped link cannot be built, subprocess.TimeoutExpired after
    killing the whole job when it outlives `timeout`, and (check=True)
    subprocess.CalledProcessError on a non-zero exit. `wrap` is an argv prefix put
    before python on every rank (e.g. a py-spy record command); `env` adds variables.
    With COMMRT_PERF_PROFILE=DIR in the environment (set by ``python -m perf run --profile``)
    and no `wrap`, every rank is recorded by py-spy into DIR/<module>-n<N>-<link>/.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    profile_root = os.environ.get("COMMRT_PERF_PROFILE")
    if profile_root and not wrap:
        # `python -m perf run --profile`: every job, also those a driver script launches,
        # runs its ranks under py-spy (perf/infra/profile.py), one folder per job.
        name = f"{module.split('.')[-1].lstrip('_')}-n{nprocs}-{link}"
        if ranks_per_node:
            name += f"-{ranks_per_node}pn"
        wrap = wrap_command(_unique_dir(Path(profile_root), name))
    with emulated_link(link, nprocs=nprocs, ranks_per_node=ranks_per_node) as setup:
        cmd = [*setup.prefix, mpirun_executable(), *setup.mpirun_args, "-n", str(nprocs),
               *wrap, sys.executable, *python_args, "-m", module, *args]
        full_env = job_env(nprocs, {**setup.env, **(env or {})})
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=full_env, cwd=str(REPO_ROOT), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            # Timeout, Ctrl-C or SIGTERM: kill the whole job before the namespace goes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if sys.exc_info()[0] is subprocess.TimeoutExpired:
                raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
            raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=out, stderr=err)
    return result
