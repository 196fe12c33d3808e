"""PyTorch's own distributed test suite on commrt: ``DistributedTest._DistTestBase`` from
the installed torch, on ``mpirun -n 3``, against ``tests/support/torch_suite_expected_commrt.txt``.

How a test runs on each rank, which of torch's gates are opened for commrt and how the
ranks agree on an outcome: `worker_torch_suite`; hangs, crashes and the expected list:
`torch_suite`. ``COMMRT_TORCH_SUITE_BACKEND=gloo`` (or ``commrt,gloo``) runs the same
harness on gloo against ``tests/support/torch_suite_expected_gloo.txt``, to compare pass counts.
The cheap tests below check the harness's own verdicts without launching anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch_suite import (
    Expected,
    Outcome,
    SuiteRun,
    check,
    excluded,
    expected_path,
    read_expected,
    report,
    run_suite,
)
from worker_torch_suite import GateName

SUITE_BACKENDS = [b.strip() for b in
                  os.environ.get("COMMRT_TORCH_SUITE_BACKEND", "commrt").split(",") if b.strip()]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", SUITE_BACKENDS)
def test_torch_distributed_suite(backend: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    def log(line: str) -> None:          # progress and the summary show in CI's log
        with capsys.disabled():
            print(line, flush=True)

    expected = read_expected(expected_path(backend))
    log("")
    run = run_suite(backend, exclude=excluded(expected), work_dir=tmp_path, log=log)
    problems, notes = check(run, expected)
    text = report(run, problems, notes)
    log(text)
    assert not problems, text


# A handful of the suite's tests the way torch runs them itself: TestDistBackend spawns the
# three ranks per test and they call init_process_group with no MPI launcher
# (support/torch_suite_spawn.py; the whole suite that way takes about half an hour here).
SPAWNED = ["test_all_reduce_sum_async", "test_broadcast_group", "test_all_gather_coalesced",
           "test_DistributedDataParallel_requires_grad", "test_send_recv_any_source"]


@pytest.mark.timeout(900)
def test_torch_suite_spawned_ranks_as_under_mpirun(capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    from harness import REPO_ROOT, launcher_free_env

    select = [arg for name in SPAWNED for arg in ("-k", name)]
    script = Path(__file__).parents[1] / "support" / "torch_suite_spawn.py"
    proc = subprocess.run([sys.executable, str(script), *select], env=launcher_free_env(),
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=840)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("torch suite on")]
    with capsys.disabled():
        print("\n" + "\n".join(summary), flush=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "every outcome as under mpirun" in proc.stdout
    passed = [line for line in proc.stdout.splitlines() if line.endswith(": passed")]
    assert len(passed) >= len(SPAWNED), proc.stdout[-6000:]


# --------------------------------------------------------------------------------------
# The harness's own verdicts


def _run(**outcomes: str) -> SuiteRun:
    return SuiteRun("commrt", 3, {n: Outcome(o, f"detail of {n}") for n, o in outcomes.items()},
                    jobs=1, seconds=1.0, work_dir=Path("."), selected=False)


def test_check_accepts_listed_outcomes_and_notes_new_passes() -> None:
    expected = Expected(2, {"test_c": ("skipped", "needs CUDA"), "test_d": ("error", "bug"),
                            "test_e": ("excluded", "no sparse tensors")})
    run = _run(test_a="passed", test_b="passed", test_c="skipped", test_d="passed",
               test_e="skipped")
    problems, notes = check(run, expected)
    assert problems == []
    assert len(notes) == 1 and notes[0].startswith("test_d: passes now")


@pytest.mark.parametrize("outcome", ["skipped", "failed", "error", "hang"])
def test_check_fails_an_unlisted_non_pass(outcome: str) -> None:
    problems, _ = check(_run(test_a="passed", test_b=outcome), Expected(1, {}))
    assert len(problems) == 1 and problems[0].startswith(f"test_b: {outcome}, expected passed")
    assert "detail of test_b" in problems[0]


def test_check_fails_a_different_non_pass_a_pass_drop_and_a_stale_entry() -> None:
    expected = Expected(3, {"test_b": ("skipped", "needs CUDA"), "test_gone": ("skipped", "x")})
    problems, _ = check(_run(test_a="passed", test_b="hang"), expected)
    assert any(p.startswith("test_b: hang, expected skipped (needs CUDA)") for p in problems)
    assert any("test_gone" in p and "no such test" in p for p in problems)
    assert any("1 tests passed, expected at least 3" in p for p in problems)
    assert len(problems) == 3


def test_read_expected_requires_a_reason_and_min_passed(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# comment\nmin_passed 7\ntest_x   skipped  needs # CUDA devices\n")
    assert read_expected(good) == Expected(7, {"test_x": ("skipped", "needs # CUDA devices")})
    for text in ("min_passed 1\ntest_x skipped\n", "min_passed 1\ntest_x passed fine\n",
                 "test_x skipped why\n", "min_passed 1\ntest_x hang a\ntest_x hang b\n"):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError):
            read_expected(bad)


def test_gate_name_is_commrt_that_takes_the_cpu_paths_of_gloo_and_mpi() -> None:
    name = GateName("commrt")
    assert name == "commrt" and name == "gloo" and name == "mpi"
    assert name != "nccl" and not (name != "gloo") and name not in {"gloo", "mpi"}
    assert name in {"commrt"} and name.upper() == "COMMRT" and f"{name}" == "commrt"
    import torch.distributed as dist

    assert dist.Backend(name) == "commrt"
