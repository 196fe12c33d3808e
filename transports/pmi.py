"""A PMI-1 server, so that processes started by any launcher can form one MPI world.

MPICH's processes learn their rank, their job's size and each other's addresses from a
process manager over the PMI-1 wire protocol: ``PMI_PORT=host:port`` and ``PMI_ID=<rank>``
in the environment, then text lines ``cmd=<name> key=value ...`` over a TCP socket.
``mpirun`` is one such process manager; this module is another, small enough to start
beside any job (see `commrt.transports.rendezvous.pmi_bootstrap`, which the backend uses
under torchrun and torch.multiprocessing).

The server answers, for the `size` ranks of one job named `kvsname`:

* ``initack pmiid=R`` with ``initack`` and the ``set size/rank/debug`` lines;
* ``init``, ``get_maxes``, ``get_appnum``, ``get_my_kvsname``, ``get_universe_size``;
* ``put`` / ``get`` on the job's key-value space (``get`` of a missing key: ``rc=1``,
  which MPICH reads as "absent"; ``PMI_process_mapping`` is served when a node map is
  given);
* ``barrier_in``, answered with ``barrier_out`` once every rank has entered it, and with
  ``rc=1`` (naming the missing ranks) on the ranks waiting in it once it cannot complete:
  a rank it waits for has closed its connection, or has never connected and the barrier
  has waited `timeout` seconds. So ``MPI_Init`` fails instead of hanging, while the
  barrier of ``MPI_Finalize`` waits as long as live ranks take to reach it;
* ``finalize`` (``finalize_ack``) and ``abort``.

It runs as its own process: mpi4py holds the GIL inside ``MPI_Init`` and
``MPI_Finalize``, which wait on the server's replies, so a server thread in a rank would
deadlock that rank. It exits when every rank that connected has closed its connection
(finalized, exited or been killed) and every rank has connected, or once `timeout` passes
with ranks still missing and nobody connected. On exit it removes the job's MPICH
shared-memory segments from ``/dev/shm`` (named after a hash of the job name: ranks that
were killed, or that skipped ``MPI_Finalize``, leave them behind otherwise).

    python -m commrt.transports.pmi --size N [--kvsname NAME] [--timeout S] [--mapping M]

prints the port it listens on (all interfaces), then serves. On each other host one rank
starts ``python -m commrt.transports.pmi --kvsname NAME --clean-after PIDS``, which removes
the job's segments there once that host's ranks have exited (`clean_after`).

Messages: a few hundred bytes per rank at start (the protocol lines), plus each node
root's business card (about 9 KB, in 1 KB values) across nodes.
"""
from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time
import uuid
from pathlib import Path

__all__ = ["KEY_MAX", "VALUE_MAX", "PMIServer", "clean_after", "new_kvsname", "pid_alive",
           "ping", "remove_segments", "shm_segments", "world_id"]

KVSNAME_MAX = 256
KEY_MAX = 64
VALUE_MAX = 1024


def new_kvsname() -> str:
    """A job name unique on this machine: MPICH names its shared-memory segment after it,
    and a stale segment of the same name makes ``MPI_Init`` fail ("Out of memory")."""
    return f"commrt-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def world_id(kvsname: str) -> int:
    """MPICH's id of the job named `kvsname`: the 32-bit FNV-1a hash of the name."""
    value = 0x811C9DC5
    for byte in kvsname.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def shm_segments(kvsname: str, root: str = "/dev/shm") -> list[Path]:
    """The shared-memory segments MPICH made (or may make) for the job on this node."""
    wid = f"{world_id(kvsname):x}"
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p for pattern in (f"mpich_shm_{wid}_*", f"mpich_vci_{wid}_*")
                  for p in base.glob(pattern))


def remove_segments(kvsname: str) -> None:
    """Remove the job's segments on this host (those that exist; absent ones are fine)."""
    for path in shm_segments(kvsname):
        path.unlink(missing_ok=True)


def ping(address: str, port: int, timeout: float = 5.0) -> bool:
    """Whether a PMI server answers at address:port (a ``get_maxes`` round trip: a server
    that is being killed may still hold its listening socket, but cannot answer)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(b"cmd=get_maxes\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return reply.startswith(b"cmd=maxes")
    except OSError:
        return False


class _Client:
    __slots__ = ("sock", "inbuf", "rank")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.rank: int | None = None


class PMIServer:
    """The server of one job (see the module docstring); `serve()` returns when it is
    done, with the number of ranks that connected."""

    def __init__(self, size: int, kvsname: str, *, timeout: float = 300.0,
                 mapping: str | None = None, host: str = "0.0.0.0") -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.kvsname = kvsname
        self.timeout = timeout
        self.kvs: dict[str, str] = {}
        if mapping:
            self.kvs["PMI_process_mapping"] = mapping
        self.listener = socket.create_server((host, 0), backlog=max(size, 16))
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self.connected: set[int] = set()           # ranks that ever said initack
        self.barrier: list[_Client] = []
        self.barrier_since: float | None = None

    # -- the protocol -----------------------------------------------------------------

    def _reply(self, client: _Client, *lines: str) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        try:
            client.sock.sendall(data)
        except OSError:
            self._drop(client)

    def _handle(self, client: _Client, line: str) -> None:
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        cmd = fields.get("cmd", "")
        if cmd == "initack":
            client.rank = int(fields.get("pmiid", -1))
            if not 0 <= client.rank < self.size:
                self._reply(client, f"cmd=initack rc=1 msg=pmiid_{client.rank}_out_of_range")
                return
            self.connected.add(client.rank)
            self._reply(client, "cmd=initack", f"cmd=set size={self.size}",
                        f"cmd=set rank={client.rank}", "cmd=set debug=0")
        elif cmd == "init":
            ok = fields.get("pmi_version") == "1"
            self._reply(client, "cmd=response_to_init pmi_version=1 pmi_subversion=1 "
                        f"rc={0 if ok else 1}")
        elif cmd == "get_maxes":
            self._reply(client, f"cmd=maxes kvsname_max={KVSNAME_MAX} keylen_max={KEY_MAX} "
                        f"vallen_max={VALUE_MAX} rc=0")
        elif cmd == "get_appnum":
            self._reply(client, "cmd=appnum appnum=0 rc=0")
        elif cmd == "get_my_kvsname":
            self._reply(client, f"cmd=my_kvsname kvsname={self.kvsname} rc=0")
        elif cmd == "get_universe_size":
            self._reply(client, f"cmd=universe_size size={self.size} rc=0")
        elif cmd == "put":
            self.kvs[fields.get("key", "")] = fields.get("value", "")
            self._reply(client, "cmd=put_result rc=0 msg=success")
        elif cmd == "get":
            value = self.kvs.get(fields.get("key", ""))
            if value is None:
                self._reply(client, "cmd=get_result rc=1 msg=key_not_found")
            else:
                self._reply(client, f"cmd=get_result rc=0 msg=success value={value}")
        elif cmd == "barrier_in":
            if not self.barrier:
                self.barrier_since = time.monotonic()
            self.barrier.append(client)
            if len(self.barrier) == self.size:
                self._end_barrier(0)
        elif cmd == "finalize":
            self._reply(client, "cmd=finalize_ack rc=0")
        elif cmd == "abort":
            sys.stderr.write(f"commrt PMI server ({self.kvsname}): rank {client.rank} "
                             f"aborted the job: {line}\n")
        else:
            self._reply(client, f"cmd={cmd or 'unknown'}_result rc=1 msg=unsupported")

    def _barrier_cannot_complete(self, now: float) -> bool:
        """A rank the barrier waits for has gone (connected, then closed its connection),
        or has not connected and the barrier has waited `timeout`. A barrier every live
        rank may still reach waits as long as it takes (MPI_Finalize's, when ranks finish
        far apart)."""
        inside = {c.rank for c in self.barrier}
        alive = {c.rank for c in self.clients.values() if c.rank is not None}
        waited_for = set(range(self.size)) - inside
        if any(r in self.connected and r not in alive for r in waited_for):
            return True
        return bool(waited_for - self.connected) and \
            self.barrier_since is not None and now - self.barrier_since > self.timeout

    def _end_barrier(self, rc: int) -> None:
        waiting, self.barrier, self.barrier_since = self.barrier, [], None
        if rc:
            inside = {c.rank for c in waiting}
            missing = sorted(set(range(self.size)) - inside)
            msg = f"msg=ranks_{'_'.join(map(str, missing))}_missing"
        else:
            msg = ""
        for client in waiting:
            self._reply(client, f"cmd=barrier_out rc={rc} {msg}".rstrip())

    # -- the loop ---------------------------------------------------------------------

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd in self.clients:
            del self.clients[fd]
            self.selector.unregister(client.sock)
        if client in self.barrier:
            self.barrier.remove(client)
        client.sock.close()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        while b"\n" in client.inbuf:
            line, client.inbuf = client.inbuf.split(b"\n", 1)
            if line.strip():
                self._handle(client, line.decode(errors="replace").strip())

    def done(self) -> bool:
        if self.clients:
            return False
        return len(self.connected) == self.size

    def serve(self) -> int:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        started = time.monotonic()
        try:
            while not self.done():
                now = time.monotonic()
                if not self.clients and now - started > self.timeout:
                    break                   # ranks missing, and nobody left to serve
                if self.barrier and self._barrier_cannot_complete(now):
                    self._end_barrier(1)
                for key, _ in self.selector.select(timeout=0.5):
                    if key.fileobj is self.listener:
                        try:
                            sock, _ = self.listener.accept()
                        except OSError:
                            continue
                        sock.setblocking(True)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        client = _Client(sock)
                        self.clients[sock.fileno()] = client
                        self.selector.register(sock, selectors.EVENT_READ, client)
                    else:
                        self._read(key.data)
        finally:
            for client in list(self.clients.values()):
                self._drop(client)
            self.selector.close()
            self.listener.close()
            remove_segments(self.kvsname)
        return len(self.connected)


def clean_after(kvsname: str, pids: list[int], poll_s: float = 0.5) -> None:
    """Once every process in `pids` (this host's ranks) has exited, remove the job's
    shared-memory segments on this host: the server does so on its own host only."""
    while pids:
        time.sleep(poll_s)
        pids = [pid for pid in pids if pid_alive(pid)]
    remove_segments(kvsname)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs; a zombie counts as exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:        # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m commrt.transports.pmi",
                                description="Serve PMI-1 to the ranks of one MPICH job.")
    p.add_argument("--size", type=int, default=None, help="ranks in the job")
    p.add_argument("--kvsname", default=None, help="job name (default: a new unique one)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a barrier may wait for missing ranks (default 300)")
    p.add_argument("--mapping", default=None,
                   help="PMI_process_mapping to serve, e.g. (vector,(0,2,4))")
    p.add_argument("--clean-after", default=None, metavar="PIDS",
                   help="instead of serving: once these processes (comma list) have exited, "
                        "remove job --kvsname's shared-memory segments on this host")
    args = p.parse_args(argv)
    if args.clean_after is not None:
        if not args.kvsname:
            p.error("--clean-after needs --kvsname")
        clean_after(args.kvsname, [int(pid) for pid in args.clean_after.split(",") if pid])
        return 0
    if args.size is None:
        p.error("--size is required")
    server = PMIServer(args.size, args.kvsname or new_kvsname(), timeout=args.timeout,
                       mapping=args.mapping)
    print(f"{server.port} {server.kvsname}", flush=True)
    sys.stdout.close()      # the starter reads one line; nothing else goes there
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
