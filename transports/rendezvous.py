"""Rendezvous: the torch.distributed TCPStore every launch needs, agreed over MPI with no
MASTER_ADDR/MASTER_PORT set by hand; and, the other way round, MPI's world formed through
a torch.distributed store where no MPI launcher started the processes.

`mpi_tcp_store` serves a TCPStore on rank 0 and tells the other ranks over MPI where it
is; `install_env_rendezvous` makes ``env://`` (init_process_group's default) use it under
an MPI launcher; `launched_by_mpi` says whether one started this process. The `commrt`
backend and ``commrt.train --backend gloo`` both rendezvous through here.

`pmi_bootstrap` is for processes started by torchrun, torch.multiprocessing or any other
launcher that gives rank, world size and a store: rank 0 starts a PMI server
(`commrt.transports.pmi`) as a helper process and publishes its address in the store,
and every rank points MPICH at it before MPI starts, so that ``MPI_Init`` forms one
world of the same ranks.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .job import world as world_comm

__all__ = ["LAUNCHER_RANK_ENV", "MPI_LAUNCHER_ENV", "install_env_rendezvous", "ipv4_addresses",
           "launched_by_mpi", "launcher_rank", "mpi_started", "mpi_tcp_store", "network_identity",
           "pmi_bootstrap"]

# Variables an MPI launcher (mpirun/mpiexec, or srun with PMI) sets in every rank.
MPI_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                    "PMIX_RANK", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD")


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (mpirun/mpiexec/srun with PMI)."""
    return any(k in os.environ for k in MPI_LAUNCHER_ENV)


# Variables that carry this process's rank, by launcher: MPICH/Hydra, Open MPI, PMIx,
# MVAPICH, Slurm's srun, then torchrun's RANK.
LAUNCHER_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
                     "SLURM_PROCID", "RANK")


def launcher_rank() -> int:
    """This process's rank as its launcher announced it, readable before MPI starts (to
    print an error on one rank only); 0 when no launcher says."""
    for name in LAUNCHER_RANK_ENV:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def network_identity() -> str:
    """Who shares this process's loopback: the host name plus the network namespace.
    Ranks in different namespaces of one host (containers, the perf suite's emulated
    nodes) share a host name but cannot reach each other at 127.0.0.1."""
    try:
        namespace = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def ipv4_addresses() -> list[str]:
    """This process's IPv4 addresses other hosts may reach, best guess first: what the
    host name resolves to (unless loopback), then every interface's address (Linux)."""
    found: list[str] = []
    try:
        found.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:
        import fcntl
        import struct

        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(probe.fileno(), siocgifaddr,
                                         struct.pack("256s", name.encode()[:15]))
                except OSError:     # an interface with no IPv4 address
                    continue
                found.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError):
        pass
    return [a for i, a in enumerate(found)
            if not a.startswith("127.") and a not in found[:i]]


def _reachable_address(addresses: Sequence[str], port: int, deadline: float) -> str | None:
    """The first address at which something accepts a TCP connection on `port`."""
    for address in addresses:
        try:
            with socket.create_connection((address, port),
                                          timeout=max(0.5, min(5.0, deadline - time.time()))):
                return address
        except OSError:
            continue
    return None


def _address_of(identity: str, addresses: Sequence[str], port: int, timeout_s: float,
                what: str) -> str:
    """Where this process reaches a server that rank 0 started on `port`: 127.0.0.1 in
    rank 0's network namespace, else the first of rank 0's `addresses` that accepts a
    connection (retried for up to a minute, or `timeout_s` if shorter)."""
    if identity == network_identity():
        return "127.0.0.1"
    deadline = time.time() + min(60.0, timeout_s)
    while time.time() < deadline:
        address = _reachable_address(addresses, port, deadline)
        if address is not None:
            return address
        time.sleep(0.2)
    raise RuntimeError(
        f"commrt: cannot reach rank 0's {what} on port {port} at any of its addresses "
        f"{list(addresses) or '(none found)'}; set MASTER_ADDR and MASTER_PORT to an "
        "address every rank can reach")


def mpi_tcp_store(world: Any = None, timeout: timedelta = timedelta(minutes=30)) -> Any:
    """A ``torch.distributed.TCPStore`` agreed over MPI, with no MASTER_ADDR/PORT needed.

    Rank 0 of `world` (default: MPI's world communicator) serves it on an ephemeral port
    (the server listens on every interface) and broadcasts the port, its network identity
    and its addresses. A rank in rank 0's network namespace connects at 127.0.0.1; any
    other rank connects at the first of rank 0's addresses that accepts a connection.
    Raises RuntimeError, on the ranks that cannot reach rank 0, naming what they tried
    (set MASTER_ADDR and MASTER_PORT to choose the address yourself).
    """
    world = world if world is not None else world_comm()
    if world.rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world.size, True, timeout=timeout,
                              wait_for_workers=False)
        world.bcast_object((store.port, network_identity(), ipv4_addresses()), 0)
        return store
    port, identity, addresses = world.bcast_object(None, 0)
    try:
        address = _address_of(identity, addresses, port, timeout.total_seconds(), "store")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (rank {world.rank})") from None
    return dist.TCPStore(address, port, world.size, False, timeout=timeout)


def install_env_rendezvous() -> None:
    """Make ``env://`` (init_process_group's default) work under mpirun with no MASTER_*
    variables: where torch would fail for want of them and an MPI launcher is present,
    the store is agreed over MPI instead. Everything else goes to torch's handler."""
    import importlib

    # `torch.distributed.rendezvous` the attribute is a function; the module holds the table.
    rdzv = importlib.import_module("torch.distributed.rendezvous")
    handlers = getattr(rdzv, "_rendezvous_handlers", None)
    original = None if handlers is None else handlers.get("env")
    if original is None or getattr(original, "_commrt_wrapped", False):
        return

    def env_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: Any):
        from urllib.parse import urlparse

        if launched_by_mpi() and "MASTER_ADDR" not in os.environ \
                and "MASTER_PORT" not in os.environ:
            world = world_comm()
            store, rank, size = mpi_tcp_store(world, timeout), world.rank, world.size
            query = dict(kv.split("=", 1) for kv in urlparse(url).query.split("&") if "=" in kv)
            for key, mpi_value in (("rank", rank), ("world_size", size)):
                given = int(query.get(key, -1))
                if given not in (-1, mpi_value):
                    raise RuntimeError(
                        f"commrt: init_process_group got {key}={given} but MPI says "
                        f"{mpi_value}; under mpirun let MPI assign rank and world size")
            yield store, rank, size
            raise RuntimeError("Unable to perform re-rendezvous using env:// under mpirun")
        yield from original(url, timeout=timeout, **kwargs)

    env_rendezvous._commrt_wrapped = True  # type: ignore[attr-defined]
    handlers["env"] = env_rendezvous


# --------------------------------------------------------------------------------------
# MPI's world through a torch.distributed store (no MPI launcher)

PMI_STORE_KEY = "commrt/pmi"
# The helpers this process started, the PMI server (rank 0) or a host's cleaner (kept
# referenced: they outlive this process's use of them).
_pmi_servers: list[subprocess.Popen] = []


def mpi_started() -> bool:
    """Whether MPI is already initialised in this process (by mpi4py, at its import)."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and bool(mpi.Is_initialized())


def _node_mapping(size: int) -> str | None:
    """MPICH's ``PMI_process_mapping`` from torchrun's LOCAL_WORLD_SIZE (ranks in blocks
    of that many per node); None (MPICH then compares host names) without it."""
    try:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if local < 1 or size % local:
        return None
    return f"(vector,(0,{size // local},{local}))"


def _start_pmi_server(size: int, timeout_s: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "commrt.transports.pmi", "--size", str(size),
           "--timeout", f"{timeout_s:g}"]
    mapping = _node_mapping(size)
    if mapping:
        cmd += ["--mapping", mapping]
    # Its own session: a Ctrl-C to the launcher's process group must not end it before
    # the ranks have finalized (their PMI connections end it).
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    first = (server.stdout.readline() if server.stdout else "").split()
    if len(first) != 2:
        status = server.poll()
        raise RuntimeError("commrt: the PMI server (python -m commrt.transports.pmi) did "
                           f"not start (exit status {status})")
    _pmi_servers.append(server)
    return int(first[0]), first[1]


def pmi_bootstrap(store: Any, rank: int, size: int,
                  timeout: timedelta = timedelta(minutes=30)) -> None:
    """Join a `size`-rank MPI world as rank `rank`, through `store` (a torch.distributed
    Store every rank shares): call before MPI starts.

    Rank 0 starts the PMI server and publishes (port, network identity, addresses, job
    name) in the store; every rank then records its arrival and waits for all of them,
    and sets PMI_PORT/PMI_ID (dropping a PMI_FD inherited from some other launcher, and
    choosing PMI-1 where a PMIx environment would make MPICH's choice ambiguous).

    Then MPI starts (``MPI_Init`` through the server). Should the server be gone when the
    process exits, it leaves with status 1 and a message instead of calling
    ``MPI_Finalize``, which would crash on the dead connection, and removes the job's
    shared-memory segments itself.

    Raises RuntimeError: MPI already started in this process (it was imported before, or
    this is a fork of a process that had); ranks that did not arrive within `timeout`
    (named); rank 0's server not reachable.
    """
    if mpi_started():
        raise RuntimeError(
            "commrt: MPI was already started in this process before init_process_group, so "
            "it cannot join the other ranks (it is a world of its own). Do not use MPI "
            "(mpi4py.MPI) before init_process_group, and start ranks with the 'spawn' "
            "method, not 'fork', if the parent process has used it")
    seconds = timeout.total_seconds() if timeout else 1800.0
    if rank == 0:
        port, kvsname = _start_pmi_server(size, seconds)
        store.set(PMI_STORE_KEY, json.dumps([port, network_identity(), ipv4_addresses(),
                                             kvsname]))
    arrived = [f"{PMI_STORE_KEY}/arrived/{r}" for r in range(size)]
    store.set(arrived[rank], json.dumps([network_identity(), os.getpid()]))
    try:
        store.wait(arrived, timedelta(seconds=seconds))
    except Exception as exc:  # torch's DistStoreError on timeout, or the store went away
        try:
            missing = [r for r in range(size) if not store.check([arrived[r]])]
        except Exception:
            missing = []
        who = f"ranks {missing}" if missing else "some ranks"
        raise RuntimeError(
            f"commrt: {who} of {size} did not reach init_process_group within "
            f"{seconds:g} s (this is rank {rank}); MPI cannot start without every rank"
            ) from exc
    port, identity, addresses, kvsname = json.loads(store.get(PMI_STORE_KEY))
    _clean_this_host_after(store, arrived, rank, identity, kvsname)
    address = _address_of(identity, addresses, port, seconds, "PMI server")
    # A server that died (or was killed) would make MPI_Init crash, not fail: look first.
    from .pmi import ping  # (not at the top: see _leave_without_server)

    if not ping(address, port):
        raise RuntimeError(f"commrt: rank 0's PMI server at {address}:{port} is gone (it "
                           "exited or was killed before this rank started MPI)")
    for name in ("PMI_FD", "PMI_RANK", "PMI_SIZE", "PMI_PORT", "PMI_ID"):
        os.environ.pop(name, None)
    os.environ["PMI_PORT"] = f"{address}:{port}"
    os.environ["PMI_ID"] = str(rank)
    os.environ.setdefault("MPIR_CVAR_PMI_VERSION", "1")
    world_comm()    # MPI_Init, through the server
    # Python's exit handlers run before mpi4py's MPI_Finalize, which talks to the server
    # once more: with the server gone it would crash the rank.
    import atexit

    atexit.register(_leave_without_server, address, port, kvsname)


def _clean_this_host_after(store: Any, arrived: list[str], rank: int, server_identity: str,
                           kvsname: str) -> None:
    """On a host (network identity) other than the server's, the lowest rank there starts
    a helper that removes the job's shared-memory segments once that host's ranks have
    exited: the server removes them on its own host only, and a killed rank's stay."""
    mine = network_identity()
    if mine == server_identity:
        return
    here = [(r, pid) for r, (identity, pid) in
            ((r, json.loads(store.get(key))) for r, key in enumerate(arrived)) if identity == mine]
    if here[0][0] != rank:
        return
    pids = ",".join(str(pid) for _, pid in here)
    _pmi_servers.append(subprocess.Popen(
        [sys.executable, "-m", "commrt.transports.pmi", "--kvsname", kvsname,
         "--clean-after", pids], stdin=subprocess.DEVNULL, start_new_session=True))


def _leave_without_server(address: str, port: int, kvsname: str) -> None:
    # (Imported here, not at the top: `python -m commrt.transports.pmi` imports this
    # package first, and runpy warns about a module imported before it runs as __main__.)
    from .pmi import ping, remove_segments

    if ping(address, port):
        return
    sys.stderr.write(f"commrt: this job's PMI server ({address}:{port}) is gone (killed?): "
                     "MPI cannot finalize, so this rank exits without MPI_Finalize, "
                     "status 1\n")
    remove_segments(kvsname)                # the server would have removed them
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
