"""Bad input to `mpirun python -m commrt.train`: one line on stderr, exit code 2, no training."""
import subprocess
import sys

import pytest
from harness import REPO_ROOT, mpi_env, mpirun_executable


def _launch(nprocs, args, timeout=120):
    cmd = [mpirun_executable(), "-n", str(nprocs), sys.executable, "-m", "commrt.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), cwd=str(REPO_ROOT),
                          timeout=timeout)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "short.txt"
    # 110 bytes: less than one 65-token window per rank
    path.write_bytes(b"def f():\n    return 1\n" * 5)
    return str(path)


@pytest.mark.parametrize("case", ["unknown-method", "density", "reuse-eps", "missing-data",
                                  "short-data", "ranks-per-node", "resume-without-checkpoint"])
def test_train_cli_bad_input_exits_2(case, short_text, tmp_path):
    args, expected = {
        "unknown-method": (["--method", "bogus"], "invalid choice: 'bogus'"),
        "density": (["--method", "spardl", "--density", "1.5"], "--density must be in (0, 1]"),
        "reuse-eps": (["--method", "topka", "--reuse-eps", "nan"], "--reuse-eps must be > 0"),
        "missing-data": (["--data", str(tmp_path / "nope.txt")], "no such file or directory"),
        "short-data": (["--data", short_text], "too short for one batch"),
        "ranks-per-node": (["--method", "edit", "--ranks-per-node", "3"],
                           "--ranks-per-node 3 does not divide the world size 2"),
        "resume-without-checkpoint": (["--resume", "--out", str(tmp_path)], "no checkpoint"),
    }[case]
    proc = _launch(2, [*args, "--out", str(tmp_path / "run")] if case != "resume-without-checkpoint"
                   else args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr                   # one line, from rank 0 only
    assert lines[0].startswith("commrt.train: error: ") and expected in lines[0], lines[0]
    assert "step" not in proc.stdout, proc.stdout          # nothing trained
    assert not (tmp_path / "run").exists()


def test_train_cli_unavailable_method_is_rejected(monkeypatch):
    """A registered method whose module or class does not import is a usage error naming
    it, before anything is built."""
    import argparse

    from commrt.optim import registry
    from commrt.training import cli

    def args(method):
        return argparse.Namespace(**{**vars(cli.build_parser().parse_args([])),
                                     "method": method})

    ddp = registry.METHODS["ddp"].build
    monkeypatch.setitem(registry.METHODS, "future", registry.MethodSpec(
        (("commrt.optim.not_landed_yet", "Future"),), ddp, "a method still in review"))
    with pytest.raises(cli.UsageError, match="method 'future' is not available in this build: "
                       "commrt.optim.not_landed_yet.Future cannot be imported"):
        cli.check_args(args("future"), 1)
    monkeypatch.setitem(registry.METHODS, "nameless", registry.MethodSpec(
        (("commrt.optim.base", "NoSuchClass"),), ddp, "missing class"))
    with pytest.raises(registry.MethodUnavailable,
                       match="commrt.optim.base.NoSuchClass cannot be imported"):
        registry.check_method_available("nameless")
    for name in registry.METHODS:
        if name not in ("future", "nameless"):
            assert registry.METHODS[name].help


@pytest.mark.parametrize("method", ["spardl", "topka", "gtopk"])
def test_train_cli_reuse_flags_reach_the_sparse_hook(method, tmp_path):
    """--reuse-steps / --reuse-eps parse (defaults: reuse off) and arrive in the hook's
    SparseAllreduce; --reuse-steps 0 is a usage error. One process, a gloo group of one."""
    import torch
    import torch.distributed as dist

    from commrt.optim.registry import MethodOptions, build_method
    from commrt.training import cli

    parser = cli.build_parser()
    defaults = parser.parse_args(["--method", method])
    assert (defaults.reuse_steps, defaults.reuse_eps) == (1, 1.0)
    with pytest.raises(cli.UsageError, match="--reuse-steps must be >= 1, got 0"):
        cli.validate_args(parser.parse_args(["--method", method, "--reuse-steps", "0"]), 1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        for argv, expected in ((["--reuse-steps", "3", "--reuse-eps", "0.25"], (3, 0.25)),
                               ([], (1, 1.0))):
            args = parser.parse_args(["--method", method, *argv])
            cli.validate_args(args, 1)
            built = build_method(method, torch.nn.Linear(4, 3), MethodOptions.from_args(args),
                                 dist.group.WORLD)
            reducer = built.hook_state.reducer
            assert reducer.algorithm == method
            assert (reducer.reuse_steps, reducer.reuse_eps) == expected, argv
    finally:
        dist.destroy_process_group()


def test_train_cli_help_lists_every_method():
    proc = subprocess.run([sys.executable, "-m", "commrt.train", "--help"], capture_output=True,
                          text=True, env=mpi_env(), cwd=str(REPO_ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--method", "--density", "--teams", "--reuse-steps", "--reuse-eps", "--topk",
                 "--chunk", "--sync-interval", "--ranks-per-node", "--stages",
                 "--checkpoint-every", "--resume", "--seed", "--plot", "--out", "--data"):
        assert flag in proc.stdout, flag
    for method in ("ddp", "spardl", "topka", "gtopk", "quant8", "quant1", "demo", "flexdemo",
                   "edit", "aedit", "acco", "zero1", "dpu", "cdp"):
        assert f"{method}:" in proc.stdout, method


def test_train_cli_threads_count_ranks_mpi_does_not_see_as_local(tmp_path):
    """With MPIR_CVAR_NOLOCAL (as in the perf suite's shaped links) MPI puts each rank in a
    shared-memory group of its own; the default --threads must still divide this machine's
    cores among the ranks on it, not give each rank all of them."""
    import json
    import os

    env = {**mpi_env(), "MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi",
           "FI_PROVIDER": "tcp"}
    cmd = [mpirun_executable(), "-n", "2", sys.executable, "-m", "commrt.train", "--steps", "1",
           "--eval-iters", "1", "--quiet", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT),
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["threads_per_rank"] == max(1, len(os.sched_getaffinity(0)) // 2), summary
