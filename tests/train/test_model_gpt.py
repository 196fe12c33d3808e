"""The GPT of commrt.model: an nn.Sequential (B, T) int64 -> (B, T, V), causal, seeded."""
import math

import pytest
import torch
from torch import nn

from commrt.model import (
    PRESETS,
    Block,
    GPTConfig,
    LMHead,
    TokenAndPositionEmbedding,
    build_gpt,
    count_parameters,
    lm_loss,
    preset,
)


def _expected_parameters(c: GPTConfig) -> int:
    # the formula, written out independently of the modules
    emb = c.vocab_size * c.n_embd + c.block_size * c.n_embd
    block = (2 * 2 * c.n_embd                            # two LayerNorms
             + c.n_embd * 3 * c.n_embd + 3 * c.n_embd    # qkv
             + c.n_embd * c.n_embd + c.n_embd            # attention projection
             + c.n_embd * 4 * c.n_embd + 4 * c.n_embd    # MLP in
             + 4 * c.n_embd * c.n_embd + c.n_embd)       # MLP out
    head = 2 * c.n_embd + c.n_embd * c.vocab_size
    return emb + c.n_layer * block + head


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_model_gpt_structure_and_shapes(name):
    config = PRESETS[name]
    model = build_gpt(config, seed=0)
    assert isinstance(model, nn.Sequential)
    kinds = [type(m) for m in model]
    assert kinds == [TokenAndPositionEmbedding] + [Block] * config.n_layer + [LMHead]
    assert count_parameters(model) == _expected_parameters(config)
    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    logits = model(idx)
    assert logits.shape == (3, config.block_size, config.vocab_size)
    # running the children one by one (what a pipeline stage split does) is the same model
    x = idx
    for child in model:
        x = child(x)
    torch.testing.assert_close(x, logits)


def test_model_gpt_is_causal():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = build_gpt(config, seed=1)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50, (2, 16), generator=g)
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 50, (2, 7), generator=g)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])          # the past ignores the future
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4         # and the future is used


def test_model_gpt_attention_matches_reference():
    # one block against a hand-written float64 causal attention + MLP
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    block = build_gpt(config, seed=3)[1].double()
    x = torch.randn(2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    h = block.ln1(x)
    q, k, v = block.attn.qkv(h).split(8, dim=2)
    heads = lambda z: z.view(2, 8, 2, 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(torch.triu(torch.ones(8, 8, dtype=torch.bool), 1), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 8)
    y = x + block.attn.proj(att)
    m = block.mlp
    y = y + m.proj(torch.nn.functional.gelu(m.fc(block.ln2(y))))
    torch.testing.assert_close(block(x), y)


def test_model_gpt_seed_and_initial_loss():
    config = PRESETS["tiny"]
    a, b, c = build_gpt(config, seed=5), build_gpt(config, seed=5), build_gpt(config, seed=6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    # small initial weights: predictions are near uniform, loss ≈ ln(vocab)
    idx = torch.randint(0, 256, (4, 64))
    loss = lm_loss(a(idx), torch.randint(0, 256, (4, 64)))
    assert abs(float(loss.detach()) - math.log(256)) < 0.1
    # the global RNG is left as it was
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_gpt(config, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_model_gpt_bad_config():
    with pytest.raises(ValueError, match="multiple of n_head"):
        build_gpt(GPTConfig(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("enormous")
    with pytest.raises(ValueError, match="exceeds the context length"):
        build_gpt(GPTConfig(block_size=4))(torch.zeros(1, 5, dtype=torch.long))
    assert preset("tiny", n_layer=3, n_embd=None).n_layer == 3
