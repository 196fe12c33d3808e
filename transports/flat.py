"""Flat layout: a list of tensors held back to back in one 1-D tensor.

The one implementation of flatten/unflatten in commrt. Every layer that moves or shards
several tensors as one buffer uses it: the torch backend's coalesced collectives, the
ZeRO-1 shard of ACCO/ZeRO-1/DPU and CDP, EDiT's layers, FlexDeMo's manual shards and the
benchmarks. It sits in the transport layer, the lowest, so that all of them may import it
(a flat layout is how several tensors travel as one message).

Order and offsets: tensor i occupies ``[offsets[i], offsets[i] + numel_i)`` of the flat
tensor, in list order, each read as ``t.reshape(-1)`` (row-major). A padded layout ends with
zeros up to ``padded_numel``.

Functions (no layout object, for hot paths):

* ``flatten(tensors, dtype=None, device=None, numel=None) -> Tensor``: the tensors back to
  back, zero-padded to ``numel`` if given. Always a new tensor (``None`` entries: use
  `FlatLayout.flatten`, which knows each slot's size).
* ``unflatten_into(flat, tensors) -> None``: copy consecutive slices of ``flat`` into each
  tensor (``copy_``: converts dtype and device), in list order.
* ``unflatten_views(flat, shapes) -> list[Tensor]``: views of ``flat`` shaped as
  ``shapes`` (no copy: writing a view writes ``flat``).

`FlatLayout(shapes_or_tensors, world_size=1, align=1)` fixes the offsets once and adds
ZeRO-style sharding: the flat vector of ``numel`` elements is padded with zeros to
``padded_numel = world_size * shard_numel`` where ``shard_numel`` is ⌈numel / world_size⌉
rounded up to a multiple of ``align``; rank r owns ``shard_range(r) = [r·c, (r+1)·c)``,
the block a reduce-scatter of the padded vector gives it. Methods: ``flatten(tensors,
dtype=None, device=None, pad=True)`` (None entries = zeros), ``unflatten_into(flat,
tensors)``, ``views(flat)``, ``slot(flat, i)``, ``shard_range(rank)``.

Values are bit-identical to ``torch.cat([t.reshape(-1).to(dtype) ...])`` followed by zero
padding, and to slicing it back with ``view``/``copy_``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["FlatLayout", "flatten", "unflatten_into", "unflatten_views"]

Shape = torch.Size | Sequence[int]


def _fill(tensors: Sequence[torch.Tensor | None], sizes: Sequence[int], total: int,
          dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    out = torch.zeros(total, dtype=dtype, device=device)
    offset = 0
    for t, n in zip(tensors, sizes):
        if t is not None:
            out[offset:offset + n].copy_(t.reshape(-1))
        offset += n
    return out


def flatten(tensors: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None,
            numel: int | None = None) -> torch.Tensor:
    """The tensors back to back in one new 1-D tensor, zero-padded to `numel` if given.

    `dtype`/`device` default to those of the first tensor (an empty list needs `dtype`;
    it gives an empty tensor, or `numel` zeros). Entries may differ in dtype: each is
    converted as ``copy_`` does.
    """
    if not tensors:
        if dtype is None:
            raise ValueError("flatten of no tensors needs a dtype")
        return torch.zeros(numel or 0, dtype=dtype, device=device)
    first = tensors[0]
    dtype = dtype or first.dtype
    device = torch.device(device) if device is not None else first.device
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    if numel is not None and numel < total:
        raise ValueError(f"numel={numel} is smaller than the {total} elements to flatten")
    if (numel is None or numel == total) and all(
            t.dtype == dtype and t.device == device for t in tensors):
        return torch.cat([t.reshape(-1) for t in tensors])   # fast path: one kernel
    return _fill(tensors, sizes, total if numel is None else numel, dtype, device)


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat[offset_i : offset_i + numel_i]`` into tensor i (in place, ``copy_``)."""
    offset, total = 0, flat.numel()
    for t in tensors:
        n = t.numel()
        if offset + n > total:
            raise ValueError(f"the tensors hold more than the flat tensor's {total} elements")
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


def unflatten_views(flat: torch.Tensor, shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """Views of consecutive slices of `flat`, one per shape (no copy)."""
    out, offset, total = [], 0, flat.numel()
    for shape in shapes:
        n = math.prod(shape)
        if offset + n > total:
            raise ValueError(f"the shapes hold more than the flat tensor's {total} elements")
        out.append(flat[offset:offset + n].view(shape))
        offset += n
    return out


class FlatLayout:
    """Offsets of a fixed list of tensor shapes in one flat vector, padded for sharding.

    ``FlatLayout(items, world_size=1, align=1)``: `items` are tensors or shapes. Attributes:
    ``shapes``, ``sizes``, ``offsets``, ``numel`` (sum of sizes), ``world_size``,
    ``shard_numel`` (⌈numel/world_size⌉ rounded up to a multiple of `align`),
    ``padded_numel`` (world_size · shard_numel). See the module docstring.
    """

    def __init__(self, items: Sequence[torch.Tensor | Shape], world_size: int = 1,
                 align: int = 1):
        if world_size < 1 or align < 1:
            raise ValueError(f"need world_size >= 1 and align >= 1, got {world_size}, {align}")
        self.shapes = [torch.Size(x.shape if isinstance(x, torch.Tensor) else x)
                       for x in items]
        self.sizes = [s.numel() for s in self.shapes]
        self.offsets = []
        offset = 0
        for n in self.sizes:
            self.offsets.append(offset)
            offset += n
        self.numel = offset
        self.world_size = world_size
        self.shard_numel = math.ceil(self.numel / (world_size * align)) * align
        self.padded_numel = self.shard_numel * world_size

    def __len__(self) -> int:
        return len(self.shapes)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of rank's shard in the padded flat vector."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def flatten(self, tensors: Sequence[torch.Tensor | None], *,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                pad: bool = True) -> torch.Tensor:
        """The flat vector of `tensors` (one per slot; None = zeros), padded to
        ``padded_numel`` unless ``pad=False``. dtype/device default to the first tensor's."""
        self._check(tensors)
        given = [t for t in tensors if t is not None]
        if dtype is None or device is None:
            if not given:
                raise ValueError("all tensors are None: pass dtype and device")
            dtype = dtype or given[0].dtype
            device = device if device is not None else given[0].device
        total = self.padded_numel if pad else self.numel
        if len(given) == len(tensors):
            return flatten(tensors, dtype=dtype, device=device, numel=total)
        return _fill(tensors, self.sizes, total, dtype, device)

    def unflatten_into(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy each slot of `flat` into the matching tensor (``copy_``)."""
        self._check(tensors)
        unflatten_into(flat, tensors)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every slot of `flat` as a view of its shape."""
        return unflatten_views(flat, self.shapes)

    def slot(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Slot i of `flat` as a view of its shape."""
        return flat[self.offsets[i]:self.offsets[i] + self.sizes[i]].view(self.shapes[i])

    def _check(self, tensors: Sequence[torch.Tensor | None]) -> None:
        if len(tensors) != len(self.shapes):
            raise ValueError(f"layout of {len(self.shapes)} tensors given {len(tensors)}")
        for i, (t, n) in enumerate(zip(tensors, self.sizes)):
            if t is not None and t.numel() != n:
                raise ValueError(f"tensor {i} has {t.numel()} elements, its slot {n}")
