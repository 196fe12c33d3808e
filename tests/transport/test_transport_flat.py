"""Flat layout (commrt.transports.flat) against an independent reference built from torch.cat,
torch.split and zero padding, on fresh random shapes (the seed is printed on failure)."""
import math

import pytest
import torch

import commrt.transports as K


def _random_shapes(gen: torch.Generator) -> list[tuple[int, ...]]:
    count = int(torch.randint(1, 7, (1,), generator=gen))
    shapes = []
    for _ in range(count):
        dims = int(torch.randint(0, 4, (1,), generator=gen))
        # sizes from 0 (an empty tensor) to 9 per dimension
        shapes.append(tuple(int(d) for d in torch.randint(0, 10, (dims,), generator=gen)))
    return shapes


def _reference_flat(tensors, dtype, total):
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    return torch.cat([flat, torch.zeros(total - flat.numel(), dtype=dtype)])


@pytest.mark.parametrize("trial", range(20))
def test_flat_matches_cat_split_fresh(trial, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = _random_shapes(gen)
    world = int(torch.randint(1, 6, (1,), generator=gen))
    align = int(torch.randint(1, 5, (1,), generator=gen))
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    where = f"seed {seed}: shapes {shapes}, world {world}, align {align}"

    layout = K.FlatLayout(tensors, world_size=world, align=align)
    n = sum(math.prod(s) for s in shapes)
    assert layout.numel == n, where
    assert layout.shard_numel % align == 0 and layout.padded_numel >= n, where
    assert layout.padded_numel - n < world * align, where   # no more padding than needed
    assert layout.padded_numel == world * layout.shard_numel, where
    ranges = [layout.shard_range(r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.padded_numel, where
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), where

    # flatten: plain, padded, dtype-converted, with None slots
    assert torch.equal(K.flatten(tensors), _reference_flat(tensors, torch.float64, n)), where
    assert torch.equal(layout.flatten(tensors),
                       _reference_flat(tensors, torch.float64, layout.padded_numel)), where
    assert torch.equal(layout.flatten(tensors, dtype=torch.float32, pad=False),
                       _reference_flat(tensors, torch.float32, n)), where
    holes = [t if i % 2 else None for i, t in enumerate(tensors)]
    filled = [t if i % 2 else torch.zeros_like(t) for i, t in enumerate(tensors)]
    got = layout.flatten(holes, dtype=torch.float64, device="cpu")
    assert torch.equal(got, _reference_flat(filled, torch.float64, layout.padded_numel)), where

    # back: views and copies match torch.split of the reference
    flat = torch.randn(layout.padded_numel, generator=gen, dtype=torch.float64)
    pieces = torch.split(flat[:n], [math.prod(s) for s in shapes])
    views = layout.views(flat)
    outs = [torch.empty(s, dtype=torch.float32) for s in shapes]
    layout.unflatten_into(flat, outs)
    for i, (piece, view, out, shape) in enumerate(zip(pieces, views, outs, shapes)):
        assert view.shape == torch.Size(shape), where
        assert torch.equal(view, piece.view(shape)), where
        assert torch.equal(layout.slot(flat, i), piece.view(shape)), where
        assert torch.equal(out, piece.view(shape).float()), where
    if n:
        last = max(i for i, s in enumerate(shapes) if math.prod(s))
        views[last].view(-1)[-1:].fill_(7.0)   # views alias the flat tensor
        assert flat[n - 1] == 7.0, where


def test_flat_bad_input():
    layout = K.FlatLayout([(2, 3), (4,)], world_size=2)
    assert (layout.numel, layout.shard_numel, layout.padded_numel) == (10, 5, 10)
    with pytest.raises(ValueError):
        layout.flatten([torch.zeros(6)])                      # wrong count
    with pytest.raises(ValueError):
        layout.flatten([torch.zeros(5), torch.zeros(4)])      # wrong size
    with pytest.raises(ValueError):
        layout.flatten([None, None])                          # no dtype to infer
    with pytest.raises(ValueError):
        layout.shard_range(2)
    with pytest.raises(ValueError):
        K.flatten([torch.zeros(3)], numel=2)
    with pytest.raises(ValueError):
        K.flatten([])
    assert K.flatten([], dtype=torch.float32).numel() == 0
    with pytest.raises(ValueError):
        K.unflatten_into(torch.zeros(3), [torch.zeros(4)])
    with pytest.raises(ValueError):
        K.FlatLayout([(1,)], world_size=0)
