"""DDP communication hooks (sparse and quantized) on the `commrt` backend and on gloo.

Each rank trains a small float64 model for a few SGD steps through DDP with a commrt hook
and checks, at every step, against an independent reference: the local gradient of an
undistributed copy of the same model on this rank's batch.

- density 1: the gradient DDP applies equals the exact mean of the ranks' local gradients;
- any density / 8-bit: per parameter, Σ_ranks residual_after + P·applied gradient
  == Σ_ranks (local gradient + residual_before) — the residuals the state keeps per bucket
  carry over correctly across steps (and across DDP's bucket rebuild after step 1);
- the parameters stay identical on every rank;
- with threshold reuse (reuse_steps > 1) the same, and the reducer's adaptive state (h,
  thresholds) round-trips through the hook state's state_dict.

Launches: the `commrt` default group (hooks on it and on a gloo group made with
new_group) at 3 ranks; gloo as the default group, its TCPStore port agreed over mpi4py,
at 2 ranks.
"""
import copy

import torch
from mpi_harness import run_ranks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 5)).double()


def _gather(comm, t):
    t = t.reshape(-1).to(torch.float64)
    out = torch.empty(comm.size * t.numel(), dtype=torch.float64)
    comm.iallgather(t, out, kind="test").wait()
    return out.view(comm.size, -1)


def _train_and_check(comm, pg, name, state, hook, exact):
    from torch.nn.parallel import DistributedDataParallel as DDP

    P = comm.size
    model = _model()
    ddp = DDP(model, process_group=pg)
    bucket_params: dict[int, list] = {}

    def recording_hook(st, bucket):
        bucket_params[bucket.index()] = list(bucket.parameters())
        return hook(st, bucket)

    ddp.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    params = list(model.parameters())
    res_before = {id(p): torch.zeros_like(p).reshape(-1) for p in params}
    g = torch.Generator().manual_seed(123 + comm.rank)
    for step in range(4):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        y = torch.randn(8, 5, generator=g, dtype=torch.float64)
        reference = copy.deepcopy(model)
        torch.nn.functional.mse_loss(reference(x), y).backward()
        local = {id(p): q.grad.reshape(-1).clone() for p, q in zip(params, reference.parameters())}
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        # this rank's residual per parameter, read through the buckets' parameter order
        res_after = {}
        for index, plist in bucket_params.items():
            residual = state.residuals.by_bucket[index][0]
            offset = 0
            for p in plist:
                res_after[id(p)] = residual[offset: offset + p.numel()].clone()
                offset += p.numel()
        for p in params:
            applied = p.grad.reshape(-1)
            locals_ = _gather(comm, local[id(p)])
            if exact:
                err = (applied - locals_.mean(0)).abs().max().item()
                assert err < 1e-12, f"{name} step {step}: gradient off the exact mean by {err}"
            gap = (_gather(comm, res_after[id(p)]).sum(0) + P * applied
                   - locals_.sum(0) - _gather(comm, res_before[id(p)]).sum(0))
            assert gap.abs().max().item() < 1e-11, \
                f"{name} step {step}: conservation off by {gap.abs().max().item()}"
        res_before = res_after
        opt.step()
    if getattr(state, "reducer", None) is not None and hasattr(state.reducer, "reuse_steps"):
        # the adaptive state (h, kept thresholds) round-trips through the state_dict
        saved = state.state_dict(params)
        assert set(saved["reducer"]) == {"adaptive_h", "thresholds"}, saved["reducer"]
        if state.reducer.reuse_steps > 1 and state.reducer.density < 1:
            assert saved["reducer"]["thresholds"], f"{name}: no thresholds kept"
        fresh = type(state)(state.reducer.density, state.reducer.algorithm,
                            state.reducer.teams, pg, reuse_steps=state.reducer.reuse_steps)
        fresh.load_state_dict(saved, params)
        assert fresh.reducer.state_dict() == saved["reducer"]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    everyone = _gather(comm, flat)
    assert torch.equal(everyone.min(0).values, everyone.max(0).values), \
        f"{name}: parameters differ across ranks"


def _cases(pg, P):
    from commrt.hooks import (
        QuantizedAllreduceState,
        SparseAllreduceState,
        quantized_allreduce_hook,
        sparse_allreduce_hook,
    )

    teams = P if P > 1 else 1
    return [
        ("spardl exact", SparseAllreduceState(1.0, "spardl", process_group=pg),
         sparse_allreduce_hook, True),
        ("spardl", SparseAllreduceState(0.1, "spardl", process_group=pg),
         sparse_allreduce_hook, False),
        (f"spardl teams={teams}", SparseAllreduceState(0.1, "spardl", teams, pg),
         sparse_allreduce_hook, False),
        ("topka", SparseAllreduceState(0.1, "topka", process_group=pg),
         sparse_allreduce_hook, False),
        ("gtopk", SparseAllreduceState(0.1, "gtopk", process_group=pg),
         sparse_allreduce_hook, False),
        ("spardl reuse", SparseAllreduceState(0.1, "spardl", teams, pg, reuse_steps=3),
         sparse_allreduce_hook, False),
        ("topka reuse", SparseAllreduceState(0.1, "topka", process_group=pg, reuse_steps=3),
         sparse_allreduce_hook, False),
        ("dense", SparseAllreduceState(0.1, "dense", process_group=pg),
         sparse_allreduce_hook, True),
        ("quant8", QuantizedAllreduceState(8, process_group=pg),
         quantized_allreduce_hook, False),
        ("quant1", QuantizedAllreduceState(1, pg, block_size=64),
         quantized_allreduce_hook, False),
    ]


def _hook_worker(default_backend: str) -> None:
    import torch.distributed as dist

    import commrt.backend  # noqa: F401  (registers the commrt backend)
    from commrt import transports as T

    comm = T.world()
    if default_backend == "commrt":
        dist.init_process_group("commrt")
        groups = {"commrt": None, "gloo": dist.new_group(backend="gloo")}
    else:
        # gloo as the default group; the TCPStore's port is agreed over mpi4py
        if comm.rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, comm.size, True, wait_for_workers=False)
            comm.bcast_object(store.port, 0)
        else:
            port = comm.bcast_object(None, 0)
            store = dist.TCPStore("127.0.0.1", port, comm.size, False)
        dist.init_process_group("gloo", store=store, rank=comm.rank, world_size=comm.size)
        groups = {"gloo": None}
    try:
        for gname, pg in groups.items():
            transport = T.for_group(pg)
            expect_mpi = gname == "commrt"
            assert (getattr(transport, "mpi", None) is not None) == expect_mpi, transport
            for name, state, hook, exact in _cases(pg, comm.size):
                _train_and_check(comm, pg, f"{gname}/{name}", state, hook, exact)
            print(f"rank {comm.rank}: hooks on {gname} OK", flush=True)
    finally:
        dist.destroy_process_group()


def test_hook_ddp_commrt_and_gloo_subgroup():
    out = run_ranks(_hook_worker, 3, timeout=300, env={"GLOO_SOCKET_IFNAME": "lo"},
                    default_backend="commrt")
    assert out.count("hooks on gloo OK") == 3 and out.count("hooks on commrt OK") == 3


def test_hook_ddp_gloo_default_group():
    out = run_ranks(_hook_worker, 2, timeout=300, env={"GLOO_SOCKET_IFNAME": "lo"},
                    default_backend="gloo")
    assert out.count("hooks on gloo OK") == 2
