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
at 2 ranks. Each (group, hook configuration) is a check: every rank prints ``CHECK
<group>/<case> rank <r> OK|FAIL`` and one pytest test per check reads it. Batches are
fresh per launch (its seed is printed on failure).
"""
import copy

import pytest
import torch
from harness import assert_check, checks_fixture, gather_rows, generator, run_checks

CASES = ["spardl_exact", "spardl", "spardl_teams", "topka", "gtopk", "spardl_reuse",
         "topka_reuse", "dense", "quant8", "quant1"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 5)).double()


def _train_and_check(comm, seed, pg, name, state, hook, exact):
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
    g = generator(seed, "batches", name, comm.rank)
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
            locals_ = gather_rows(comm, local[id(p)])
            if exact:
                err = (applied - locals_.mean(0)).abs().max().item()
                assert err < 1e-12, f"{name} step {step}: gradient off the exact mean by {err}"
            gap = (gather_rows(comm, res_after[id(p)]).sum(0) + P * applied
                   - locals_.sum(0) - gather_rows(comm, res_before[id(p)]).sum(0))
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
    everyone = gather_rows(comm, flat)
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
    # name: (state, hook, whether the applied gradient is the exact mean); in CASES' order
    return {
        "spardl_exact": (SparseAllreduceState(1.0, "spardl", process_group=pg),
                         sparse_allreduce_hook, True),
        "spardl": (SparseAllreduceState(0.1, "spardl", process_group=pg),
                   sparse_allreduce_hook, False),
        "spardl_teams": (SparseAllreduceState(0.1, "spardl", teams, pg),
                         sparse_allreduce_hook, False),
        "topka": (SparseAllreduceState(0.1, "topka", process_group=pg),
                  sparse_allreduce_hook, False),
        "gtopk": (SparseAllreduceState(0.1, "gtopk", process_group=pg),
                  sparse_allreduce_hook, False),
        "spardl_reuse": (SparseAllreduceState(0.1, "spardl", teams, pg, reuse_steps=3),
                         sparse_allreduce_hook, False),
        "topka_reuse": (SparseAllreduceState(0.1, "topka", process_group=pg, reuse_steps=3),
                        sparse_allreduce_hook, False),
        "dense": (SparseAllreduceState(0.1, "dense", process_group=pg),
                  sparse_allreduce_hook, True),
        "quant8": (QuantizedAllreduceState(8, process_group=pg),
                   quantized_allreduce_hook, False),
        "quant1": (QuantizedAllreduceState(1, pg, block_size=64),
                   quantized_allreduce_hook, False),
    }


def _group_checks(comm, seed, gname, pg) -> dict:
    """The checks of one process group: its transport, then one per hook configuration."""
    from commrt import transports as T

    def transport() -> None:
        found = T.for_group(pg)
        assert (getattr(found, "mpi", None) is not None) == (gname == "commrt"), found

    def train(name, state, hook, exact):
        return lambda: _train_and_check(comm, seed, pg, f"{gname}/{name}", state, hook, exact)

    cases = _cases(pg, comm.size)
    assert list(cases) == CASES
    return {f"{gname}/transport": transport,
            **{f"{gname}/{name}": train(name, *case) for name, case in cases.items()}}


def _hook_worker(seed: int, default_backend: str) -> None:
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
        checks = {}
        for gname, pg in groups.items():
            checks.update(_group_checks(comm, seed, gname, pg))
        run_checks(checks, rank=comm.rank)
    finally:
        dist.destroy_process_group()


def _commrt_default_worker(seed: int) -> None:
    _hook_worker(seed, "commrt")


def _gloo_default_worker(seed: int) -> None:
    _hook_worker(seed, "gloo")


GROUP_CHECKS = ["transport", *CASES]
commrt_launch = checks_fixture(_commrt_default_worker, [3], timeout=300,
                               variants={"commrt": {"GLOO_SOCKET_IFNAME": "lo"}})
gloo_launch = checks_fixture(_gloo_default_worker, [2], timeout=300,
                             variants={"gloo": {"GLOO_SOCKET_IFNAME": "lo"}})


@pytest.mark.parametrize("group", ["commrt", "gloo"])
@pytest.mark.parametrize("check", GROUP_CHECKS)
def test_hook_ddp_commrt_default_group(commrt_launch, group, check):
    """The commrt default group, and a gloo group made with new_group beside it."""
    assert_check(commrt_launch, f"{group}/{check}")


@pytest.mark.parametrize("check", GROUP_CHECKS)
def test_hook_ddp_gloo_default_group(gloo_launch, check):
    assert_check(gloo_launch, f"gloo/{check}")
