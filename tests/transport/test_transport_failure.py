"""An error on one rank ends the whole job; disagreeing ranks get an error, not a hang."""
import time

import pytest
import torch
from harness import run_ranks


def _one_rank_raises_worker() -> None:
    from commrt import transports as T

    comm = T.world()
    if comm.rank == comm.size - 1:
        raise RuntimeError("injected failure on the last rank")
    comm.iallreduce(torch.ones(4)).wait()  # the others would wait here forever


def _thread_raises_worker() -> None:
    import threading

    from commrt import transports as T

    comm = T.world()
    if comm.rank == 0:
        threading.Thread(target=lambda: 1 / 0, name="comm-thread").start()
    comm.barrier()  # never completes: rank 0 joins only after its thread failed
    time.sleep(30)
    comm.barrier()


def _mismatch_worker() -> None:
    from commrt import transports as T

    comm = T.world()
    n = 10 + comm.rank  # ranks disagree on the size
    try:
        comm.check_uniform([n, 7], "tensor size and dtype")
    except ValueError as e:
        assert "differs across ranks" in str(e)
    else:
        raise AssertionError("disagreeing sizes were accepted")
    comm.barrier()  # every rank got the error and is still in step


@pytest.mark.parametrize("worker, message", [
    (_one_rank_raises_worker, "injected failure on the last rank"),
    (_thread_raises_worker, "ZeroDivisionError"),
])
def test_transport_error_on_one_rank_ends_job(worker, message):
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_ranks(worker, 3, timeout=60)
    assert "timed out" not in str(failure.value), "the job hung instead of aborting"
    assert message in str(failure.value), "the failing rank's traceback was lost"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("nprocs", [2, 4])
def test_transport_check_uniform_raises_everywhere(nprocs):
    run_ranks(_mismatch_worker, nprocs)
