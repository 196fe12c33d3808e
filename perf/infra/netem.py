"""Emulated networks for MPI jobs: plain shared memory, or shaped links in network namespaces.

Two emulations, both confined to network namespaces created for the job and deleted
afterwards, so nothing else on the machine is touched (docs/design.md §6):

* **flat** (``ranks_per_node=None``): one namespace whose loopback is shaped by ``tc tbf``
  at the requested rate; MPICH is forced onto TCP (``MPIR_CVAR_NOLOCAL=1``, netmod ofi,
  ``FI_PROVIDER=tcp``) so every message crosses the shaped loopback. All ranks share that
  one loopback: the rate is the *aggregate* capacity of the fabric (a shared medium, like
  one switch uplink), so a ring allreduce of B bytes on P ranks needs 2(P−1)·B/rate.
* **two-tier** (``ranks_per_node=r``): ``nprocs/r`` "node" namespaces, each joined to a hub
  namespace's bridge by its own veth pair shaped at the rate in both directions (a NIC
  per node behind a non-blocking switch). The ranks of one node share memory (MPICH shm,
  fast); ranks of different nodes talk TCP over their node's shaped veth. Hydra's
  launcher is pointed at a small exec script that starts each node's proxy inside that
  node's namespace. With ``r = 1`` this is the per-rank-NIC model.

Teardown is guaranteed by ``try/finally`` plus an ``atexit`` hook and SIGTERM/SIGHUP
handlers that turn those signals into ``SystemExit`` (Ctrl-C already raises
``KeyboardInterrupt``); namespaces left behind by a SIGKILLed run (their creator's pid is
part of the name) are removed by the next run. Without root, ``ip`` or ``tc`` a shaped
link raises :class:`LinkUnavailable` (callers report it and run ``shm`` only).

Usage (:func:`perf.infra.launch.launch_mpi` runs a benchmark job over a link this way)::

    from perf.infra.netem import emulated_link, LinkUnavailable
    with emulated_link("1gbit", nprocs=4) as setup:
        subprocess.run(setup.prefix + [mpirun, *setup.mpirun_args, "-n", "4", ...],
                       env={**os.environ, **setup.env})
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from commrt.transports.pmi import pid_alive

_NS_PREFIX = "commrt"          # namespace names: commrt<kind>-<pid>-<n>
_HUB_SUBNET = "10.213.0"        # bridge and node addresses in the two-tier emulation
_BRIDGE_IP = f"{_HUB_SUBNET}.254"

TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


class LinkUnavailable(RuntimeError):
    """A shaped link was requested but this process cannot create network namespaces."""


@dataclass
class LinkSetup:
    """What a command needs to run over an emulated link.

    prefix: argv prefix that places `mpirun` where it must run (empty for shm).
    env: environment additions for mpirun and the ranks.
    mpirun_args: extra mpirun arguments (hosts and launcher for the two-tier form).
    namespaces: the namespaces created (deleted when the context exits).
    nodes: two-tier form: (address, namespace) of each node, in node order; a launcher
    other than mpirun (torchrun) starts each node's processes with ``ip netns exec``.
    """

    link: str
    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    mpirun_args: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    ranks_per_node: int | None = None
    nodes: list[tuple[str, str]] = field(default_factory=list)


_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
_UNIT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def link_rate_bps(link: str) -> float | None:
    """Bits per second of a link name ("1gbit" -> 1e9, "100mbit" -> 1e8); None for "shm"."""
    link = link.strip().lower()
    if link == "shm":
        return None
    m = _RATE_RE.match(link)
    if not m:
        raise ValueError(f"unknown link {link!r}: use 'shm' or a rate such as 100mbit, 1gbit, "
                         "10gbit")
    return float(m.group(1)) * _UNIT[m.group(2)]




def link_unavailable_reason() -> str | None:
    """Why shaped links cannot be emulated here, or None when they can.

    COMMRT_NETEM_DISABLE=1 refuses on purpose (to see what an unprivileged user gets)."""
    if os.environ.get("COMMRT_NETEM_DISABLE", "0") not in ("", "0"):
        return "disabled by COMMRT_NETEM_DISABLE"
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root or with CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    return None


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise LinkUnavailable(f"`{' '.join(cmd)}` failed: {why}")
    return proc


# ---------------------------------------------------------------------------------- teardown
_live_namespaces: set[str] = set()
_lock = threading.Lock()
_counter = 0
_handlers_installed = False


def _kill_namespace_processes(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _run(["ip", "netns", "del", ns], check=False)
    with _lock:
        _live_namespaces.discard(ns)


def _delete_all_live() -> None:
    for ns in sorted(_live_namespaces):
        _delete_namespace(ns)


def _signal_to_exit(signum, frame):
    # SystemExit unwinds through every `finally`, so the namespaces are deleted.
    raise SystemExit(128 + signum)


def _install_teardown_hooks() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_delete_all_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _signal_to_exit)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces of earlier runs whose creating process is gone; return their names."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.match(rf"^{_NS_PREFIX}[a-z]+-(\d+)-\d+$", name)
        if m and not pid_alive(int(m.group(1))):
            _delete_namespace(name)
            removed.append(name)
    return removed


def _new_namespace(kind: str) -> str:
    global _counter
    with _lock:
        _counter += 1
        name = f"{_NS_PREFIX}{kind}-{os.getpid()}-{_counter}"
        _live_namespaces.add(name)
    _run(["ip", "netns", "add", name])
    _run(["ip", "-n", name, "link", "set", "lo", "up"])
    return name


def _tbf(ns: str, dev: str, link: str) -> list[str]:
    # burst must hold at least rate/HZ bytes; 256 KiB keeps 10 Gbit/s accurate too.
    return ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", link,
            "burst", "256kb", "latency", "50ms"]


# ---------------------------------------------------------------------------- the emulations
def _launcher_script(directory: Path, host_to_ns: dict[str, str]) -> Path:
    """Hydra's launcher-exec: called as `script [ssh options] HOST CMD...`, runs CMD in
    HOST's namespace."""
    lines = ["#!/bin/sh",
             "# generated by perf/infra/netem.py: start a hydra proxy inside a node namespace",
             "while [ $# -gt 0 ]; do case \"$1\" in -*) shift ;; *) break ;; esac; done",
             "host=\"$1\"; shift", "case \"$host\" in"]
    for host, ns in host_to_ns.items():
        lines.append(f"  {host}) exec ip netns exec {ns} sh -c \"$*\" ;;")
    lines += ["  *) echo \"netem launcher: unknown host $host\" >&2; exit 1 ;;", "esac", ""]
    path = directory / "netem_launch.sh"
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def emulated_link(link: str, *, nprocs: int | None = None,
                  ranks_per_node: int | None = None) -> Iterator[LinkSetup]:
    """Create the emulation for `link` and yield a :class:`LinkSetup`; always tear it down.

    link: "shm" (no namespace) or a tc rate ("100mbit", "1gbit", "10gbit").
    ranks_per_node: None for the flat shaped loopback; r for the two-tier form
    (requires nprocs, a multiple of r): shm inside a node, the shaped rate between nodes.
    """
    rate = link_rate_bps(link)
    if rate is None:
        if ranks_per_node is not None:
            raise ValueError("ranks_per_node needs a shaped link (the shm link has no nodes)")
        yield LinkSetup(link="shm")
        return
    reason = link_unavailable_reason()
    if reason is not None:
        raise LinkUnavailable(f"cannot emulate {link}: {reason}")
    _install_teardown_hooks()
    remove_stale_namespaces()
    created: list[str] = []
    tmpdir = None
    try:
        if ranks_per_node is None:
            ns = _new_namespace("net")
            created.append(ns)
            _run(_tbf(ns, "lo", link))
            yield LinkSetup(link=link, prefix=["ip", "netns", "exec", ns],
                            env={"MPIR_CVAR_NOLOCAL": "1", **TCP_ENV}, namespaces=created)
            return
        if nprocs is None or ranks_per_node < 1 or nprocs % ranks_per_node:
            raise ValueError(f"two-tier link needs nprocs ({nprocs}) to be a multiple of "
                             f"ranks_per_node ({ranks_per_node})")
        nodes = nprocs // ranks_per_node
        if nodes > 250:
            raise ValueError(f"at most 250 emulated nodes, asked for {nodes}")
        hub = _new_namespace("hub")
        created.append(hub)
        _run(["ip", "-n", hub, "link", "add", "crbr", "type", "bridge"])
        _run(["ip", "-n", hub, "addr", "add", f"{_BRIDGE_IP}/24", "dev", "crbr"])
        _run(["ip", "-n", hub, "link", "set", "crbr", "up"])
        host_to_ns: dict[str, str] = {}
        for node in range(nodes):
            ns = _new_namespace("node")
            created.append(ns)
            ip = f"{_HUB_SUBNET}.{node + 1}"
            host_to_ns[ip] = ns
            hub_end = f"crv{node}"
            # Create the pair inside the hub, then move one end into the node as "crnic".
            _run(["ip", "-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", "crnic"])
            _run(["ip", "-n", hub, "link", "set", "crnic", "netns", ns])
            _run(["ip", "-n", hub, "link", "set", hub_end, "master", "crbr"])
            _run(["ip", "-n", hub, "link", "set", hub_end, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "crnic"])
            _run(["ip", "-n", ns, "link", "set", "crnic", "up"])
            # Shape both directions: node egress on its NIC, node ingress on the hub's port.
            _run(_tbf(ns, "crnic", link))
            _run(_tbf(hub, hub_end, link))
        tmpdir = Path(tempfile.mkdtemp(prefix="commrt-netem-"))
        script = _launcher_script(tmpdir, host_to_ns)
        hosts = ",".join(f"{ip}:{ranks_per_node}" for ip in host_to_ns)
        yield LinkSetup(
            link=link, prefix=["ip", "netns", "exec", hub],
            env={**TCP_ENV, "FI_TCP_IFACE": "crnic", "GLOO_SOCKET_IFNAME": "crnic"},
            mpirun_args=["-launcher", "ssh", "-launcher-exec", str(script), "-hosts", hosts,
                         "-localhost", _BRIDGE_IP],
            namespaces=created, ranks_per_node=ranks_per_node, nodes=list(host_to_ns.items()))
    finally:
        for ns in reversed(created):
            _delete_namespace(ns)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
