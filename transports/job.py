"""The job: the world communicator, ending the whole job when one rank fails, and the
`mpirun` that starts jobs.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

from .library import load_mpi
from .mpi import Communicator


def mpirun_executable() -> str:
    """The `mpirun` beside this interpreter (the PyPI mpich wheel's), else one on PATH."""
    import shutil
    from pathlib import Path

    here = Path(sys.executable).with_name("mpirun")
    if here.exists():
        return str(here)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpirun found: install the MPI extra (pip install -e '.[mpi]') "
                           "or a system MPI")
    return found


# --------------------------------------------------------------------------------------
# The world, and ending the whole job on an error

_world: Communicator | None = None
_world_lock = threading.Lock()


def world() -> Communicator:
    """The communicator of every rank of the job (MPI.COMM_WORLD), initialising MPI.

    With more than one rank, an uncaught exception on any rank aborts the whole job
    (`install_abort_on_error`) unless COMMRT_ABORT_ON_ERROR=0.
    """
    global _world
    if _world is None:
        with _world_lock:
            if _world is None:
                comm = Communicator(load_mpi().COMM_WORLD)
                if comm.size > 1 and os.environ.get("COMMRT_ABORT_ON_ERROR", "1") != "0":
                    install_abort_on_error()
                _world = comm
    return _world


_abort_installed = False
ABORT_GRACE_S = 0.5


def install_abort_on_error() -> None:
    """Make an uncaught exception on this rank (main thread or any other) print its
    traceback and then MPI_Abort the whole job, so the other ranks never wait forever in
    a collective this rank will not join."""
    global _abort_installed
    if _abort_installed:
        return
    _abort_installed = True
    previous_hook = sys.excepthook

    def multi_rank() -> bool:
        MPI = load_mpi()
        return MPI.Is_initialized() and not MPI.Is_finalized() and \
            MPI.COMM_WORLD.Get_size() > 1

    def report_and_abort(header: str, exc_type, exc, tb) -> None:
        # Written to the process's real stderr: torch.distributed's own excepthook redirects
        # sys.stderr into a buffer that it prints only after this hook returns, and an
        # abort never returns.
        MPI = load_mpi()
        text = header + "".join(traceback.format_exception(exc_type, exc, tb))
        prefix = f"[rank{MPI.COMM_WORLD.Get_rank()}] "
        out = sys.__stderr__
        out.write("".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")))
        out.flush()
        sys.stdout.flush()
        # The launcher forwards each rank's output asynchronously and stops once the abort
        # kills the job: give it a moment, or the message that says what failed is lost.
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(1)

    def excepthook(exc_type, exc, tb):
        if multi_rank():
            report_and_abort("", exc_type, exc, tb)
        previous_hook(exc_type, exc, tb)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        header = f"commrt: uncaught exception in thread {args.thread.name}:\n"
        if multi_rank():
            report_and_abort(header, args.exc_type, args.exc_value, args.exc_traceback)
        sys.stderr.write(header)
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
