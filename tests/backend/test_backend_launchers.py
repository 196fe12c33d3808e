"""The `commrt` backend in processes no MPI launcher started: torchrun (env://) and
torch.multiprocessing (spawn and fork, file:// and tcp://) form one MPI world through
commrt's PMI server (commrt.transports.pmi); its failure cases; the server's protocol.

Every job runs in a fresh subprocess with a timeout (a hang fails the test), in an
environment stripped of mpirun's variables. DDP results are checked in the ranks against
one process training on the whole batch (tests/support/worker_launcher.py)."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from harness import REPO_ROOT, finish_job, launcher_free_env, mpi_env, start_job

from commrt.transports import pmi
from commrt.transports.rendezvous import PMI_STORE_KEY, network_identity, pmi_bootstrap

WORKER = str(Path(__file__).parents[1] / "support" / "worker_launcher.py")


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return start_job(args, env or launcher_free_env())


def _finish(proc: subprocess.Popen, timeout: float = 240.0) -> tuple[int, str]:
    return finish_job(proc, timeout, "the job")


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 240.0) -> str:
    code, out = _finish(_start(args, env), timeout)
    assert code == 0, f"exit {code}:\n{out[-6000:]}"
    return out


def _ranks_ok(out: str, size: int) -> None:
    for rank in range(size):
        assert f"RANK-OK {rank}" in out, out[-6000:]


def _leftovers() -> tuple[set[str], list[str]]:
    """MPICH's shared-memory segments, and running PMI servers."""
    shm = {p.name for p in Path("/dev/shm").glob("mpich_*")} if Path("/dev/shm").is_dir() \
        else set()
    servers = subprocess.run(["pgrep", "-f", "commrt.transports.pmi"], capture_output=True,
                             text=True).stdout.split()
    return shm, servers


def _spawn_args(mode: str, method: str, size: int, url: str, *extra: str) -> list[str]:
    return [sys.executable, WORKER, mode, method, str(size), *extra, url]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_launch_torchrun_ddp(nprocs: int, seed: int) -> None:
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nprocs}", WORKER, "ddp", str(seed)])
    _ranks_ok(out, nprocs)


def test_launch_torchrun_two_emulated_nodes(seed: int) -> None:
    # Two hosts of two ranks, as network namespaces joined by a bridge (perf.infra.netem): one
    # torchrun per node, static rendezvous at node 0's address. Ranks of node 1 reach the
    # PMI server at node 0's address, MPICH's node map comes from LOCAL_WORLD_SIZE, and
    # the nodes talk TCP across the bridge.
    from perf.infra.netem import emulated_link, link_unavailable_reason

    reason = link_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    shm_before, _ = _leftovers()
    with emulated_link("10gbit", nprocs=4, ranks_per_node=2) as setup:
        master = setup.nodes[0][0]
        port = str(_free_port())
        env = launcher_free_env(setup.env)
        jobs = [_start(["ip", "netns", "exec", ns, sys.executable, "-m",
                        "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                        "--nproc-per-node=2", f"--master-addr={master}", f"--master-port={port}",
                        WORKER, "ddp", str(seed)], env)
                for node, (_, ns) in enumerate(setup.nodes)]
        outs = []
        for job in jobs:
            code, out = _finish(job)
            assert code == 0, out[-6000:]
            outs.append(out)
    _ranks_ok("".join(outs), 4)
    assert "RANK-OK 2" in outs[1] and "RANK-OK 3" in outs[1]
    _wait_for_no_leftovers(shm_before)      # node 1's cleaner, too, has finished


@pytest.mark.parametrize("method,nprocs,scheme", [("spawn", 2, "file"), ("spawn", 4, "tcp"),
                                                  ("fork", 2, "tcp"), ("fork", 4, "file")])
def test_launch_multiprocessing_ddp(tmp_path, method: str, nprocs: int, scheme: str,
                                    seed: int) -> None:
    url = f"file://{tmp_path / 'rdzv'}" if scheme == "file" else f"tcp://127.0.0.1:{_free_port()}"
    out = _run(_spawn_args("spawn-ddp", method, nprocs, url, str(seed)))
    _ranks_ok(out, nprocs)


def test_launch_two_jobs_at_once(tmp_path, seed: int) -> None:
    jobs = [_start(_spawn_args("spawn-ddp", "spawn", 2, f"file://{tmp_path / f'rdzv{i}'}",
                               str(seed + i))) for i in range(2)]
    for job in jobs:
        code, out = _finish(job)
        assert code == 0, out[-6000:]
        _ranks_ok(out, 2)


def test_launch_ignores_inherited_pmi_and_pmix_variables(tmp_path, seed: int) -> None:
    # A PMI_FD left by some other process manager, and a PMIx job's variables (as inside
    # a Slurm allocation): commrt's server must still be the one MPICH talks to.
    env = launcher_free_env({"PMI_FD": "99", "PMIX_NAMESPACE": "slurm.pmix.1.0",
                             "PMIX_SERVER_URI41": "x"})
    out = _run(_spawn_args("spawn-ddp", "spawn", 2, f"file://{tmp_path / 'rdzv'}",
                           str(seed)), env=env)
    _ranks_ok(out, 2)


def test_launch_missing_rank_fails_on_every_arrived_rank(tmp_path) -> None:
    shm_before, _ = _leftovers()
    start = time.monotonic()
    out = _run(_spawn_args("spawn-missing", "spawn", 3, f"file://{tmp_path / 'rdzv'}"))
    for rank in (0, 1):
        assert f"RANK-ERROR {rank}: commrt: ranks [2] of 3 did not reach init_process_group " \
               "within 6 s" in out, out[-6000:]
    assert time.monotonic() - start < 60, "init did not fail within its timeout"
    _wait_for_no_leftovers(shm_before)


def test_launch_mpi_started_before_init_is_a_clear_error(tmp_path) -> None:
    out = _run(_spawn_args("spawn-premature", "spawn", 2, f"file://{tmp_path / 'rdzv'}"))
    for rank in (0, 1):
        assert f"RANK-ERROR {rank}: commrt backend: init_process_group gave world size 2, " \
               "but MPI was already started in this process" in out, out[-6000:]


def test_launch_mpi_that_does_not_join_is_a_clear_error(tmp_path) -> None:
    out = _run(_spawn_args("spawn-unjoined", "spawn", 2, f"file://{tmp_path / 'rdzv'}"))
    for rank in (0, 1):
        assert f"RANK-ERROR {rank}: commrt backend: MPI did not form the 2-rank world through " \
               "commrt's PMI server (MPI library: MPICH" in out, out[-6000:]


def test_launch_killed_rank_leaves_nothing_behind(tmp_path) -> None:
    shm_before, _ = _leftovers()
    code, out = _finish(_start(_spawn_args("spawn-killed", "spawn", 3,
                                           f"file://{tmp_path / 'rdzv'}")))
    assert code != 0, out[-6000:]          # torch.multiprocessing reports the killed rank
    _wait_for_no_leftovers(shm_before)


def test_launch_server_killed_mid_job_ends_cleanly(tmp_path) -> None:
    shm_before, _ = _leftovers()
    code, out = _finish(_start(_spawn_args("spawn-server-killed", "spawn", 3,
                                           f"file://{tmp_path / 'rdzv'}")))
    _ranks_ok(out, 3)                       # the job's own work completed
    assert code != 0, out[-6000:]           # and its ranks then exit with status 1
    assert "PMI server" in out and "is gone (killed?)" in out, out[-6000:]
    assert "SIGSEGV" not in out and "signal 11" not in out.lower(), out[-6000:]
    _wait_for_no_leftovers(shm_before)


def _wait_for_no_leftovers(shm_before: set[str], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        shm, servers = _leftovers()
        if not (shm - shm_before) and not servers:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: segments {sorted(shm - shm_before)}, PMI "
                                 f"servers {servers}")
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the bootstrap and the server, directly ------------------------------------------------


def test_pmi_bootstrap_reports_a_server_that_is_gone(monkeypatch) -> None:
    store = dist.HashStore()
    port = _free_port()                    # nothing listens there
    store.set(PMI_STORE_KEY, f'[{port}, "{network_identity()}", [], "commrt-gone"]')
    store.set(f"{PMI_STORE_KEY}/arrived/0", "1")
    for name in ("PMI_PORT", "PMI_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="PMI server at 127.0.0.1:.* is gone"):
        pmi_bootstrap(store, 1, 2)
    assert "PMI_PORT" not in os.environ


def test_pmi_world_id_is_mpich_hash() -> None:
    # Observed: MPICH 5.0.2 named this job's segment /dev/shm/mpich_shm_345bd204_0.
    assert pmi.world_id("commrt-19782-b025c21cfd28") == 0x345BD204
    assert pmi.new_kvsname() != pmi.new_kvsname()


class _Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("r")

    def send(self, line: str) -> None:
        self.sock.sendall((line + "\n").encode())

    def ask(self, line: str, replies: int = 1) -> list[str]:
        self.send(line)
        return [self.file.readline().strip() for _ in range(replies)]

    def close(self) -> None:
        self.file.close()       # (the file holds the socket open too)
        self.sock.close()


def test_pmi_server_protocol() -> None:
    kvsname = pmi.new_kvsname()
    segment = Path("/dev/shm") / f"mpich_shm_{pmi.world_id(kvsname):x}_0"
    server = pmi.PMIServer(2, kvsname, timeout=30, mapping="(vector,(0,1,2))")
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    a, b = _Client(server.port), _Client(server.port)
    assert a.ask("cmd=initack pmiid=0", 4) == ["cmd=initack", "cmd=set size=2",
                                                 "cmd=set rank=0", "cmd=set debug=0"]
    assert b.ask("cmd=initack pmiid=1", 4)[2] == "cmd=set rank=1"
    assert a.ask("cmd=init pmi_version=1 pmi_subversion=1") == [
        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0"]
    assert a.ask("cmd=get_my_kvsname") == [f"cmd=my_kvsname kvsname={kvsname} rc=0"]
    assert "vallen_max=1024" in a.ask("cmd=get_maxes")[0]
    assert a.ask(f"cmd=get kvsname={kvsname} key=PMI_process_mapping") == [
        "cmd=get_result rc=0 msg=success value=(vector,(0,1,2))"]
    assert a.ask(f"cmd=get kvsname={kvsname} key=absent")[0].startswith("cmd=get_result rc=1")
    assert a.ask(f"cmd=put kvsname={kvsname} key=card0 value=abc") == [
        "cmd=put_result rc=0 msg=success"]
    a.send("cmd=barrier_in")
    time.sleep(0.2)                         # a alone in the barrier: no answer yet
    assert b.ask("cmd=barrier_in") == ["cmd=barrier_out rc=0"]
    assert a.file.readline().strip() == "cmd=barrier_out rc=0"
    assert b.ask(f"cmd=get kvsname={kvsname} key=card0") == [
        "cmd=get_result rc=0 msg=success value=abc"]
    segment.write_bytes(b"x")               # as MPICH would leave it after a kill
    for c in (a, b):
        assert c.ask("cmd=finalize") == ["cmd=finalize_ack rc=0"]
        c.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and server.connected == {0, 1}
    assert not segment.exists()


def test_pmi_server_barrier_waits_for_live_ranks_and_fails_on_a_gone_one() -> None:
    server = pmi.PMIServer(2, pmi.new_kvsname(), timeout=0.5)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    a, b = _Client(server.port), _Client(server.port)
    a.ask("cmd=initack pmiid=0", 4)
    b.ask("cmd=initack pmiid=1", 4)
    a.send("cmd=barrier_in")
    time.sleep(1.5)             # past the timeout, but rank 1 is alive: no answer yet
    assert select.select([a.sock], [], [], 0.2)[0] == []
    b.close()                   # rank 1 gone: the barrier can never complete
    assert a.file.readline().strip() == "cmd=barrier_out rc=1 msg=ranks_1_missing"
    a.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_pmi_cleaner_removes_a_hosts_segments_once_its_ranks_are_gone() -> None:
    kvsname = pmi.new_kvsname()
    segment = Path("/dev/shm") / f"mpich_shm_{pmi.world_id(kvsname):x}_1"
    rank = subprocess.Popen(["sleep", "60"])          # stands in for this host's rank
    segment.write_bytes(b"x")
    cleaner = subprocess.Popen([sys.executable, "-m", "commrt.transports.pmi", "--kvsname",
                                kvsname, "--clean-after", str(rank.pid)], env=mpi_env())
    try:
        time.sleep(1.5)
        assert cleaner.poll() is None and segment.exists()   # the rank still runs
        rank.kill()                                          # (left a zombie a moment)
        assert cleaner.wait(timeout=10) == 0
        assert not segment.exists()
    finally:
        rank.kill()
        rank.wait()
        cleaner.kill()
        segment.unlink(missing_ok=True)


def test_pmi_server_barrier_times_out_naming_missing_ranks() -> None:
    server = pmi.PMIServer(3, pmi.new_kvsname(), timeout=1.0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    a = _Client(server.port)
    a.ask("cmd=initack pmiid=0", 4)
    start = time.monotonic()
    assert a.ask("cmd=barrier_in") == ["cmd=barrier_out rc=1 msg=ranks_1_2_missing"]
    assert time.monotonic() - start < 5
    a.close()
    thread.join(timeout=10)                 # nobody left, ranks missing past the timeout
    assert not thread.is_alive()


@pytest.mark.parametrize("method,backend", [("ddp", "commrt"), ("spardl", "commrt"),
                                            ("ddp", "gloo")])
def test_launch_torchrun_train_matches_mpirun(tmp_path, method: str, backend: str) -> None:
    # `python -m commrt.train` under torchrun forms the same 2-rank world as under mpirun
    # (with gloo, commrt's MPI world through torchrun's store) and must train to the same
    # bits.
    from commrt.transports import mpirun_executable

    args = ["-m", "commrt.train", "--method", method, "--backend", backend, "--steps", "10",
            "--eval-interval", "10"]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          *args, "--out", str(tmp_path / "torchrun")])
    subprocess.run([mpirun_executable(), "-n", "2", sys.executable, *args,
                    "--out", str(tmp_path / "mpirun")], env=mpi_env(), cwd=str(REPO_ROOT),
                   check=True, capture_output=True, timeout=240)
    got, want = (json.loads((tmp_path / run / "summary.json").read_text())
                 for run in ("torchrun", "mpirun"))
    assert got["world_size"] == want["world_size"] == 2
    assert got["final_val_loss"] == want["final_val_loss"]
    assert got["final_loss"] == want["final_loss"]
