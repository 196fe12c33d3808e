"""FlexDeMo: DeMo on a hybrid-sharded 2-D mesh (shard group inside a node, replication group
across nodes).

Gradients are averaged inside the node by a reduce-scatter (mean) over the shard group, so
each rank holds the node-mean gradient of its own flat shard. The rank runs DeMo's
compression on that shard only: momentum δ ← β·δ + lr·g on the shard, DCT-II over 1-D
chunks of the flat shard, top-k per chunk, δ ← δ − IDCT(kept). The kept coefficients are
all-gathered over the *replication group only* (the ranks of other nodes holding the same
shard), scatter-averaged and inverse-transformed into the update ``u``. The base step is
sign-SGD (``p ← p − lr·sign(u)``), plain SGD on ``u`` (``base="sgd"``) or AdamW with ``u`` as
the gradient (``base="adamw"``); weight decay is decoupled (``p ← p·(1 − lr·wd)``).
Inter-node traffic therefore grows with the number of nodes, not accelerators.

Two ways to hold the parameters:

- FSDP2: parameters are DTensors of ``fully_shard(module, mesh=mesh.device_mesh()["shard"])``
  (a ``commrt`` torch backend underneath). FSDP's backward already reduce-scatters (mean)
  the gradients inside the shard group and its next forward all-gathers the parameters;
  FlexDeMo works on each parameter's local shard (1-D chunks of its flat local tensor,
  zero-padded to a whole number of chunks). A rank whose shard of a parameter is empty
  skips it.
- Manual flat shards (plain tensors, replicated on every rank): per param group, the
  parameters are concatenated into one flat buffer of ``N = m·c`` elements (``m`` ranks per
  node, ``c`` = shard length rounded up to whole chunks); FlexDeMo reduce-scatters the flat
  gradient, updates its shard and all-gathers the parameter shards back inside the node.

Per-rank wire bytes of one step (m = ranks per node, R = nodes, 4-byte fp32 elements,
payload = Σ shard tensors nchunks·k·(2 + value_bytes) as in `commrt.optim.demo`)::

    manual:  Σ_groups 2 · ((m − 1) · 4·N_g // m)   +   (R − 1) · payload
             (reduce-scatter of gradients + all-gather of parameters, both inside the node)
    FSDP2:   (R − 1) · payload        (plus what FSDP itself moves inside the node)

``last_step_wire_bytes`` holds this number after each step (``last_step_inter_node_bytes``
the replication-group part). Transport kinds: ``"flexdemo.reduce_scatter"``,
``"flexdemo.all_gather"`` (replication group), ``"flexdemo.param_all_gather"``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from commrt.transports import FlatLayout

from .demo import (
    VALUE_BYTES,
    ChunkLayout,
    CoefficientCodec,
    WireBytesInStateDict,
    idct_sparse_chunks,
    topk_per_chunk,
)
from .mesh import HybridMesh, resolve_mesh

_BASES = ("sign", "sgd", "adamw")


class FlexDeMo(WireBytesInStateDict, torch.optim.Optimizer):
    """Hybrid-sharded DeMo (module docstring).

    Args:
        params: parameters: all FSDP2 DTensors sharded over the mesh's shard group, or all
            plain tensors identical on every rank (manual flat shards).
        lr: learning rate (scales the momentum input and the base step).
        mesh: a `HybridMesh`; else one is built over ``process_group`` with
            ``ranks_per_node`` (None: nodes from MPI shared memory).
        base: ``"sign"`` (sign-SGD), ``"sgd"`` or ``"adamw"`` (``betas``, ``eps``).
        compression_decay, compression_topk, compression_chunk, weight_decay, value_bits:
            as in `DeMo`; chunks are 1-D of ``compression_chunk`` elements.

    Raises ValueError for a bad configuration: topk > chunk, an unknown base, a process
    group that is not the mesh's, DTensors sharded over a group other than the shard group.
    """

    def __init__(self, params: Iterable[Any], lr: float, *, mesh: HybridMesh | None = None,
                 ranks_per_node: int | None = None, process_group: Any = None,
                 base: str = "sign", compression_decay: float = 0.999,
                 compression_topk: int = 32, compression_chunk: int = 64,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, value_bits: int = 32):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        if not 0.0 <= compression_decay < 1.0:
            raise ValueError(f"compression_decay must be in [0, 1), got {compression_decay}")
        if compression_chunk < 1 or compression_topk < 1:
            raise ValueError("compression_chunk and compression_topk must be ≥ 1")
        if compression_topk > compression_chunk:
            raise ValueError(f"compression_topk={compression_topk} exceeds the chunk size "
                             f"{compression_chunk} (FlexDeMo uses 1-D chunks)")
        if value_bits not in VALUE_BYTES:
            raise ValueError(f"value_bits must be 32, 16 or 8, got {value_bits}")
        if value_bits == 8 and compression_chunk > 4096:
            raise ValueError("8-bit values need 12-bit indices: compression_chunk ≤ 4096")
        if compression_chunk > 65536:
            raise ValueError("compression_chunk must be ≤ 65536 (uint16 indices)")
        defaults = dict(lr=lr, compression_decay=compression_decay,
                        compression_topk=compression_topk, compression_chunk=compression_chunk,
                        weight_decay=weight_decay, betas=betas, eps=eps)
        super().__init__(params, defaults)
        self.mesh = resolve_mesh(mesh, ranks_per_node, process_group)
        self.base = base
        self.value_bits = value_bits
        all_params = [p for g in self.param_groups for p in g["params"]]
        kinds = {isinstance(p, DTensor) for p in all_params}
        if len(kinds) != 1:
            raise ValueError("FlexDeMo needs all parameters FSDP2-sharded (DTensor) or none")
        self.fsdp = kinds.pop()
        if self.fsdp:
            for p in all_params:
                dm = p.device_mesh
                if dm.ndim != 1 or dm.size() != self.mesh.ranks_per_node:
                    raise ValueError(
                        f"a parameter is sharded over a {tuple(dm.shape)} device mesh but the "
                        f"hybrid mesh's shard group has {self.mesh.ranks_per_node} ranks: "
                        f"fully_shard(module, mesh=mesh.device_mesh()['shard'])")
        self.last_step_wire_bytes = 0
        self.last_step_inter_node_bytes = 0
        self._codec: CoefficientCodec | None = None
        self._codec_key: tuple | None = None

    # -- the shards this rank updates ------------------------------------------------

    def _shards(self) -> list[dict]:
        """Per shard tensor: its group, state key, length, padded length, layout, k."""
        out = []
        m, r = self.mesh.ranks_per_node, self.mesh.shard_index
        for group in self.param_groups:
            chunk, topk = group["compression_chunk"], group["compression_topk"]
            if self.fsdp:
                for p in group["params"]:
                    n = p.to_local().numel()
                    padded = math.ceil(n / chunk) * chunk
                    out.append(dict(group=group, key=p, params=[p], numel=n, padded=padded,
                                    layout=ChunkLayout(( padded,), 1, padded, 1, chunk), k=topk))
            else:
                # N = m·c elements, c = ⌈numel / m⌉ rounded up to whole chunks
                flat = FlatLayout(group["params"], world_size=m, align=chunk)
                per_rank = flat.shard_numel
                out.append(dict(group=group, key=group["params"][0], params=group["params"],
                                numel=flat.numel, padded=per_rank, flat=flat,
                                flat_len=flat.padded_numel, offset=flat.shard_range(r)[0],
                                layout=ChunkLayout((per_rank,), 1, per_rank, 1, chunk), k=topk))
        return out

    def _get_codec(self, shards: list[dict]) -> CoefficientCodec:
        key = tuple((s["layout"].nchunks if s["padded"] else 0, s["layout"].chunk_elems, s["k"])
                    for s in shards)
        if self._codec is None or key != self._codec_key:
            self._codec = CoefficientCodec(key, self.value_bits)
            self._codec_key = key
            self.mesh.replicate.check_uniform([len(key), self._codec.payload_bytes],
                                              "FlexDeMo payload layout")
        return self._codec

    def payload_bytes(self) -> int:
        """Bytes this rank contributes to the replication-group all-gather of a step."""
        return self._get_codec(self._shards()).payload_bytes

    # -- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shards = self._shards()
        codec = self._get_codec(shards)
        m = self.mesh.ranks_per_node
        intra_bytes = 0
        kept, works = [], []
        for s in shards:
            group, state = s["group"], self.state[s["key"]]
            if self.fsdp:
                p = s["params"][0]
                local = p.to_local()
                grad = None if p.grad is None else p.grad.to_local().reshape(-1)
                param_shard = local.view(-1)
            else:
                grad, param_shard = self._manual_shard(s)
                intra_bytes += (m - 1) * 4 * s["flat_len"] // m if m > 1 else 0
            if "delta" not in state:
                state["delta"] = torch.zeros(s["padded"], dtype=torch.float32)
                state["step"] = 0
                if self.base == "adamw":
                    state["exp_avg"] = torch.zeros(s["padded"], dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros(s["padded"], dtype=torch.float32)
            state["step"] += 1
            delta, n = state["delta"], s["numel"] if self.fsdp else s["padded"]
            delta.mul_(group["compression_decay"])
            if grad is not None and n:
                delta[:n].add_(grad.float()[:n], alpha=group["lr"])
            works.append((s, param_shard, n))
            layout = s["layout"]
            if s["padded"] == 0:
                kept.append((torch.zeros(0, s["k"]), torch.zeros(0, s["k"], dtype=torch.long)))
            else:
                kept.append(topk_per_chunk(layout.to_coeffs(delta), s["k"]))
        payload, sent_values = codec.encode(kept)
        # δ ← δ − IDCT(kept), straight from the kept (index, value) pairs (no dense copy)
        for (s, _, _), (_, indices), sent in zip(works, kept, sent_values):
            if s["padded"]:
                layout = s["layout"]
                chunks = idct_sparse_chunks(sent.float(), indices, layout.cr, layout.cc)
                self.state[s["key"]]["delta"].sub_(chunks.view(-1))
        replicate = self.mesh.replicate
        if replicate.size > 1:
            gathered = torch.empty(replicate.size * payload.numel(), dtype=torch.uint8)
            replicate.iallgather(payload, gathered, kind="flexdemo.all_gather").wait()
        else:
            gathered = payload
        decoded = codec.decode(gathered, replicate.size)
        for (s, param_shard, n), (values, indices) in zip(works, decoded):
            if not s["padded"]:
                continue
            group, state, layout = s["group"], self.state[s["key"]], s["layout"]
            update = idct_sparse_chunks(values, indices, layout.cr, layout.cc).view(-1)
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                param_shard.mul_(1.0 - lr * wd)
            if self.base == "sign":
                step_dir = update.sign()
            elif self.base == "sgd":
                step_dir = update
            else:
                beta1, beta2 = group["betas"]
                state["exp_avg"].mul_(beta1).add_(update, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(update, update, value=1 - beta2)
                t = state["step"]
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                step_dir = state["exp_avg"] / (1 - beta1 ** t) / denom
            if n:
                param_shard[:n].add_(step_dir[:n].to(param_shard.dtype), alpha=-lr)
            if not self.fsdp:
                intra_bytes += self._manual_write_back(s, param_shard)
        self.last_step_inter_node_bytes = codec.wire_bytes(replicate.size)
        self.last_step_wire_bytes = intra_bytes + self.last_step_inter_node_bytes
        return loss

    def _manual_shard(self, s: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Node-mean gradient shard (reduce-scatter) and a copy of the parameter shard."""
        per_rank, off, params = s["padded"], s["offset"], s["params"]
        flat_grad = s["flat"].flatten([p.grad for p in params], dtype=torch.float32,
                                      device=params[0].device)
        flat_param = s["flat"].flatten([p.detach() for p in params], dtype=torch.float32)
        comm = self.mesh.shard
        if comm.size > 1:
            grad_shard = torch.empty(per_rank, dtype=torch.float32)
            comm.ireduce_scatter(flat_grad, grad_shard, kind="flexdemo.reduce_scatter").wait()
            grad_shard.div_(comm.size)
        else:
            grad_shard = flat_grad
        return grad_shard, flat_param[off:off + per_rank].clone()

    def _manual_write_back(self, s: dict, param_shard: torch.Tensor) -> int:
        """All-gather the updated parameter shards inside the node; copy into the params.
        Returns the wire bytes counted for it."""
        comm = self.mesh.shard
        if comm.size > 1:
            flat = torch.empty(s["flat_len"], dtype=torch.float32)
            comm.iallgather(param_shard, flat, kind="flexdemo.param_all_gather").wait()
            sent = (comm.size - 1) * 4 * s["flat_len"] // comm.size
        else:
            flat, sent = param_shard, 0
        s["flat"].unflatten_into(flat, s["params"])
        return sent

