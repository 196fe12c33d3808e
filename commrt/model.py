"""A small decoder-only transformer (GPT), written as one `nn.Sequential`.

    model = build_gpt(PRESETS["tiny"])          # or GPTConfig(n_layer=..., ...)
    logits = model(tokens)                      # (B, T) int64 -> (B, T, vocab_size)

The model is a flat `nn.Sequential` of ``[TokenAndPositionEmbedding, Block × n_layer,
LMHead]`` so that pipeline-style methods (CDP) can cut it into stages at any child
boundary. There is no weight tying between the embedding and the head: tied weights would
cross stage boundaries. Blocks are pre-norm (LayerNorm → causal self-attention → residual,
LayerNorm → MLP → residual), as in GPT-2; the causal attention is
`F.scaled_dot_product_attention(is_causal=True)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. `block_size` is the context length (tokens per sequence)."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


# `tiny` trains to a clearly falling loss on 16 CPU ranks sharing 2 cores in a couple of
# minutes; the others are for real machines (GPUs).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
    "small": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
    "medium": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "large": GPTConfig(block_size=512, n_layer=12, n_head=12, n_embd=768),
    "xl": GPTConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    config = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


class TokenAndPositionEmbedding(nn.Module):
    """Token ids (B, T) -> token embedding + learned position embedding (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.block_size = config.block_size
        self.token = nn.Embedding(config.vocab_size, config.n_embd)
        self.position = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (B, T), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds the context length {self.block_size}")
        positions = torch.arange(t, device=idx.device)
        return self.drop(self.token(idx) + self.position(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LMHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd)
        self.out = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def _init_weights(model: nn.Sequential, config: GPTConfig) -> None:
    # GPT-2 initialisation: N(0, 0.02), zero biases, and the projections that write into
    # the residual stream scaled by 1/sqrt(2·n_layer) so its variance does not grow with depth.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for block in model:
        if isinstance(block, Block):
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))


def build_gpt(config: GPTConfig, seed: int | None = None) -> nn.Sequential:
    """The GPT as `nn.Sequential(embedding, *blocks, head)`; `seed` fixes the initial weights
    (every rank that passes the same seed builds the same model)."""
    config.validate()
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    model = nn.Sequential(
        TokenAndPositionEmbedding(config),
        *(Block(config) for _ in range(config.n_layer)),
        LMHead(config),
    )
    _init_weights(model, config)
    if generator_state is not None:
        torch.random.set_rng_state(generator_state)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
