"""Rank body of tests/transport/test_transport_rendezvous.py: the default commrt group and
a gloo subgroup come up with no MASTER_ADDR/PORT, then each does one allreduce; rank r
writes OUT/r.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

import commrt  # noqa: F401  (registers the backend)

out = sys.argv[1]
assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
dist.init_process_group("commrt")
rank, size = dist.get_rank(), dist.get_world_size()
x = torch.full((5,), float(rank + 1), dtype=torch.float64)
dist.all_reduce(x)
gloo = dist.new_group(backend="gloo")
y = torch.full((5,), float(rank + 1), dtype=torch.float64)
dist.all_reduce(y, group=gloo)
with open(os.path.join(out, f"{rank}.json"), "w") as f:
    json.dump({"size": size, "commrt": x.tolist(), "gloo": y.tolist()}, f)
dist.barrier()  # gloo aborts a rank whose peer closes its sockets while it still reads
dist.destroy_process_group()
