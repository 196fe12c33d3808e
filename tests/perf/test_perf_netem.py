"""perf/infra/netem.py (through launch.py's launch_mpi): shaped links really run at their
rate, the two-tier form keeps a node's ranks on shared memory, and the namespaces never
outlive a job (failure, timeout, Ctrl-C, SIGTERM). Without root/ip/tc the shaped cases must
raise LinkUnavailable instead."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from perf.infra import netem
from perf.infra.launch import REPO_ROOT, job_env, launch_mpi

UNAVAILABLE = netem.link_unavailable_reason()
MIB = 1 << 20


def _our_namespaces(pid: int) -> list[str]:
    if UNAVAILABLE:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.strip() and f"-{pid}-" in line.split()[0]]


def _pingpong_us(tmp_path, nprocs, link, peer=1, ranks_per_node=None, size="1m"):
    out = tmp_path / f"pp-{link}-{peer}-{ranks_per_node}.json"
    launch_mpi(nprocs, "perf.bench.pingpong",
                     ["--ops", "pingpong", "--sizes", size, "--budget-mb", "3", "--repeats", "2",
                      "--peer", str(peer), "--json", str(out)],
                     link=link, ranks_per_node=ranks_per_node, timeout=120)
    (rec,) = json.loads(out.read_text())
    assert rec["bytes"] == MIB and rec["peer"] == peer
    return rec["time_us"]


def test_perf_netem_link_names():
    assert netem.link_rate_bps("shm") is None
    assert netem.link_rate_bps("1gbit") == 1e9
    assert netem.link_rate_bps("100mbit") == 1e8
    assert netem.link_rate_bps("2.5gbit") == 2.5e9
    for bad in ("1gb", "fast", "10 gbit", ""):
        with pytest.raises(ValueError):
            netem.link_rate_bps(bad)
    with pytest.raises(ValueError):
        with netem.emulated_link("shm", ranks_per_node=2):
            pass


def test_perf_netem_shaped_rate(tmp_path):
    if UNAVAILABLE:
        with pytest.raises(netem.LinkUnavailable):
            launch_mpi(2, "perf.bench.pingpong", ["--sizes", "1k"], link="100mbit", timeout=60)
        assert _pingpong_us(tmp_path, 2, "shm") > 0
        return
    # 1 MiB one way at 100 Mbit/s needs 84 ms; tbf lets a 256 KiB burst through first.
    floor_us = (MIB - 256 * 1024) * 8 / 1e8 * 1e6
    shaped = _pingpong_us(tmp_path, 2, "100mbit")
    assert floor_us * 0.95 <= shaped <= 4 * MIB * 8 / 1e8 * 1e6, shaped
    assert _pingpong_us(tmp_path, 2, "shm") < shaped / 3
    assert _our_namespaces(os.getpid()) == []


def test_perf_netem_two_tier(tmp_path):
    if UNAVAILABLE:
        with pytest.raises(netem.LinkUnavailable):
            launch_mpi(4, "perf.bench.pingpong", [], link="100mbit", ranks_per_node=2)
        return
    with pytest.raises(ValueError):
        launch_mpi(3, "perf.bench.pingpong", [], link="100mbit", ranks_per_node=2)
    # Ranks 0,1 on node 0 and 2,3 on node 1: 0<->1 is shared memory, 0<->2 the shaped link.
    inside = _pingpong_us(tmp_path, 4, "100mbit", peer=1, ranks_per_node=2)
    across = _pingpong_us(tmp_path, 4, "100mbit", peer=2, ranks_per_node=2)
    assert across >= (MIB - 256 * 1024) * 8 / 1e8 * 1e6 * 0.95, across
    assert inside < across / 3, (inside, across)
    assert _our_namespaces(os.getpid()) == []


def test_perf_netem_teardown_on_failure_and_timeout():
    if UNAVAILABLE:  # nothing is created without privileges; the other tests check the refusal
        pytest.skip(f"emulated links unavailable here: {UNAVAILABLE}")
    with pytest.raises(subprocess.CalledProcessError):
        launch_mpi(2, "perf.bench.pingpong", ["--peer", "5"], link="1gbit", timeout=60)
    assert _our_namespaces(os.getpid()) == []
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        launch_mpi(2, "unused", python_args=["-c", "import time; time.sleep(120)"],
                         link="1gbit", ranks_per_node=1, timeout=3)
    assert time.monotonic() - start < 60
    assert _our_namespaces(os.getpid()) == []


# A shell that starts the test suite in the background (`cmd &`) leaves SIGINT ignored in
# every descendant, and Python then never raises KeyboardInterrupt: give the child the
# handler a terminal's Ctrl-C would meet.
_HANG = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
         "from perf.infra.launch import launch_mpi\n"
         "launch_mpi(2, 'unused', python_args=['-c', 'import time; time.sleep(300)'], "
         "link='1gbit', ranks_per_node={rpn}, timeout=600)\n")


@pytest.mark.parametrize("sig,rpn", [(signal.SIGINT, None), (signal.SIGTERM, 1)])
def test_perf_netem_teardown_on_signal(sig, rpn):
    if UNAVAILABLE:
        pytest.skip(f"emulated links unavailable here: {UNAVAILABLE}")
    proc = subprocess.Popen([sys.executable, "-c", _HANG.format(rpn=rpn)], cwd=str(REPO_ROOT),
                            env=job_env(2), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _our_namespaces(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "namespace never appeared"
            time.sleep(0.2)
        time.sleep(1.0)                      # let mpirun start inside it
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert _our_namespaces(proc.pid) == []


def test_perf_netem_removes_stale_namespaces():
    if UNAVAILABLE:
        pytest.skip(f"emulated links unavailable here: {UNAVAILABLE}")
    # A namespace named after a dead creator (as a SIGKILLed run leaves it) is removed.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"commrtnet-{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netem.remove_stale_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert _our_namespaces(dead.pid) == []


def test_perf_netem_without_privileges(monkeypatch, tmp_path):
    # What an unprivileged user gets: a clear refusal, and the suite keeps the shm cases.
    from perf import runner, suites
    from perf.runner import select_links

    monkeypatch.setenv("COMMRT_NETEM_DISABLE", "1")
    with pytest.raises(netem.LinkUnavailable, match="COMMRT_NETEM_DISABLE"):
        with netem.emulated_link("1gbit"):
            pass
    assert select_links(["shm", "1gbit"]) == (["shm"],
                                              {"1gbit": "disabled by COMMRT_NETEM_DISABLE"})
    assert select_links(["10gbit"])[0] == ["shm"]
    # The runner drops the shaped link and builds its jobs for shm only (one cheap job here).
    seen_links = []
    build_jobs = suites.build_jobs

    def first_job_only(suite, links, *args, **kwargs):
        seen_links.append(list(links))
        return build_jobs(suite, links, *args, **kwargs)[:1]

    monkeypatch.setattr(suites, "build_jobs", first_job_only)
    runner.run_suite("collectives", ["shm", "1gbit"], [2], tmp_path, tiny=True,
                     holdout_links=["500mbit"])
    assert seen_links == [["shm"]]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["links"] == ["shm"] and "1gbit" in run["links_skipped"]
    assert run["holdout_links"] == []
    assert [j["status"] for j in run["jobs"]] == ["ok"] and run["jobs"][0]["link"] == "shm"
    assert "skipped: {'1gbit'" in (tmp_path / "report.md").read_text()
