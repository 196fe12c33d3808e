"""Rendezvous over MPI: the torch.distributed TCPStore every launch needs, with no
MASTER_ADDR/MASTER_PORT set by hand.

`mpi_tcp_store` serves a TCPStore on rank 0 and tells the other ranks over MPI where it
is; `install_env_rendezvous` makes ``env://`` (init_process_group's default) use it under
an MPI launcher; `launched_by_mpi` says whether one started this process. The `commrt`
backend and ``commrt.train --backend gloo`` both rendezvous through here.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any, Sequence

import torch.distributed as dist

from .mpi import world as world_comm

__all__ = ["MPI_LAUNCHER_ENV", "install_env_rendezvous", "ipv4_addresses", "launched_by_mpi",
           "mpi_tcp_store", "network_identity"]

# Variables an MPI launcher (mpirun/mpiexec, or srun with PMI) sets in every rank.
MPI_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                    "PMIX_RANK", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD")


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (mpirun/mpiexec/srun with PMI)."""
    return any(k in os.environ for k in MPI_LAUNCHER_ENV)


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
    if identity == network_identity():
        address = "127.0.0.1"
    else:
        deadline = time.time() + min(60.0, timeout.total_seconds())
        address = None
        while address is None and time.time() < deadline:
            address = _reachable_address(addresses, port, deadline)
            if address is None:
                time.sleep(0.2)
        if address is None:
            raise RuntimeError(
                f"commrt: rank {world.rank} cannot reach rank 0's store on port {port} at any "
                f"of its addresses {addresses or '(none found)'}; set MASTER_ADDR and "
                "MASTER_PORT to an address every rank can reach")
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
