"""CDP's stage split (balanced, by parameters or FLOPs), its activation meter and its
configuration errors; single-process (validation happens before any communication)."""
import itertools

import pytest
import torch
from torch import nn

from commrt.optim.cdp import CDP, ActivationMeter, balanced_partition, stage_costs


def _brute_force_best(costs, k):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0,) + cuts + (n,)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_cdp_partition_is_balanced_and_contiguous(seed):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(0, 50, (9,), generator=g).tolist()
    for k in range(1, 10):
        bounds = balanced_partition(costs, k)
        assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
        assert all(a < b for a, b in bounds)
        assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
        assert max(sum(costs[a:b]) for a, b in bounds) == _brute_force_best(costs, k)


def test_cdp_flop_costs_follow_layer_sizes():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 32), nn.Linear(32, 8))
    flops = stage_costs(model, "flops", torch.randn(5, 8))
    assert flops == [2 * 5 * 8 * 8, 0.0, 2 * 5 * 8 * 32, 2 * 5 * 32 * 8]
    params = stage_costs(model, "params")
    assert params == [72.0, 0.0, 288.0, 264.0]
    with pytest.raises(ValueError, match="sample_input"):
        stage_costs(model, "flops")
    with pytest.raises(ValueError, match="unknown cost"):
        stage_costs(model, "time")


def test_cdp_bad_configuration_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"stages \(4\) > layers \(3\)"):
        CDP(model, opt, stages=4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="stages must be an integer >= 1"):
            CDP(model, opt, stages=bad)
    with pytest.raises(ValueError, match="unknown CDP rule 'v3'"):
        CDP(model, opt, stages=2, rule="v3")
    with pytest.raises(ValueError, match="sharded CDP supports rule='v1' only"):
        CDP(model, opt, stages=2, rule="v2", sharded=True)
    with pytest.raises(ValueError, match="nn.Sequential"):
        CDP(nn.Linear(2, 2), opt, stages=1)
    with pytest.raises(ValueError, match="workers_per_device"):
        CDP(model, opt, stages=2, workers_per_device=0)
    with pytest.raises(ValueError, match="stages > layers"):
        balanced_partition([1.0, 2.0], 3)


def test_activation_meter_counts_saved_tensors_not_parameters():
    lin = nn.Linear(16, 16)
    meter = ActivationMeter({p.untyped_storage().data_ptr() for p in lin.parameters()})
    x = torch.randn(4, 16, requires_grad=True)
    with meter.hooks():
        y = torch.tanh(lin(x))
    # saved: the input of the matmul (4x16) and tanh's output (4x16); the weight is excluded
    assert meter.current == 2 * 4 * 16 * 4
    y.sum().backward()
    del y
    assert meter.current == 0 and meter.peak == 2 * 4 * 16 * 4
