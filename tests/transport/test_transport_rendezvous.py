"""The backend's MPI-agreed store: ranks that share a host name but not a network namespace
(containers, the perf suite's emulated nodes) must still find rank 0's store. Before the
fix they connected to their own 127.0.0.1 and hung in the first collective."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from commrt.transports import mpirun_executable, rendezvous
from perf.infra import netem
from perf.infra.launch import job_env

WORKER = Path(__file__).parents[1] / "support" / "worker_rendezvous.py"


def test_backend_rendezvous_identity_and_addresses():
    identity = rendezvous.network_identity()
    assert identity.startswith(__import__("socket").gethostname() + "/")
    assert identity == rendezvous.network_identity()
    addresses = rendezvous.ipv4_addresses()
    assert all(not a.startswith("127.") for a in addresses)
    assert len(addresses) == len(set(addresses))


@pytest.mark.parametrize("nprocs,ranks_per_node", [(4, 2), (3, 1)])
def test_backend_rendezvous_across_namespaces(tmp_path, nprocs, ranks_per_node):
    reason = netem.link_unavailable_reason()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    with netem.emulated_link("10gbit", nprocs=nprocs, ranks_per_node=ranks_per_node) as setup:
        cmd = [*setup.prefix, mpirun_executable(), *setup.mpirun_args, "-n", str(nprocs),
               sys.executable, str(WORKER), str(tmp_path)]
        env = job_env(nprocs, setup.env)
        env.pop("MASTER_ADDR", None)
        env.pop("MASTER_PORT", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [float(sum(range(1, nprocs + 1)))] * 5
    for rank in range(nprocs):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result == {"size": nprocs, "commrt": expected, "gloo": expected}
