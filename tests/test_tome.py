"""Token merging (opt-in): merging is lossless where merged tokens are equal, attention sees N - r tokens,
only the top attention level merges, and images stay reproducible and close to unmerged ones.

Its cost in prompt adherence on the built-in model is measured by `benchmarks/quality_speedups.py`."""

import numpy as np
import pytest
import torch

import sdlab
from sdlab.config import SD15, TINY
from sdlab.errors import ParameterError
from sdlab.model import Model
from sdlab.nn.layers import TransformerBlock
from sdlab.nn.unet import UNet
from sdlab.params import GenerationParams
from sdlab.tome import TokenMerger, token_merging, top_attention_blocks


def cell_constant_tokens(batch=2, h=6, w=8, channels=16) -> torch.Tensor:
    """(B, h*w, C) tokens that are equal within each 2x2 cell and differ between cells."""
    cells = torch.randn(batch, channels, h // 2, w // 2)
    return cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).flatten(2).transpose(1, 2)


def test_merging_equal_neighbours_loses_nothing():
    tokens = cell_constant_tokens()
    merge, unmerge = TokenMerger(0.75).plan(tokens, (6, 8))
    merged = merge(tokens)
    assert merged.shape == (2, 12, 16)  # one token per cell
    torch.testing.assert_close(unmerge(merged), tokens, rtol=0, atol=0)


@torch.no_grad()
def test_block_output_is_unchanged_when_merged_tokens_are_equal():
    """Four equal keys per cell weigh the same in softmax as one per cell, so attention is unchanged."""
    block = TransformerBlock(16, heads=2, context_dim=8).eval()
    tokens, context = cell_constant_tokens(), torch.randn(2, 5, 8)
    plain = block(tokens, context, size=(6, 8))
    block.token_merger = TokenMerger(0.75)
    torch.testing.assert_close(block(tokens, context, size=(6, 8)), plain, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_self_attention_sees_fewer_tokens_and_the_context_restores_the_unet():
    unet = UNet(TINY.unet).eval()
    blocks = top_attention_blocks(unet)
    assert blocks and all(b.token_merger is None for b in blocks)
    seen = []
    hook = blocks[0].attn1.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 7, TINY.unet.context_dim)
    plain = unet(x, 500, context)
    with token_merging(unet, 0.5):
        merged = unet(x, 500, context)
    restored = unet(x, 500, context)
    hook.remove()
    assert seen == [256, 256 - 128, 256]
    assert not torch.equal(merged, plain)
    torch.testing.assert_close(restored, plain, rtol=0, atol=0)


def test_only_the_highest_resolution_attention_level_merges():
    unet = UNet(SD15.unet.__class__(channels=(32, 32, 32), attention_levels=(False, True, True),
                                   context_dim=8, num_heads=2, norm_groups=8))
    blocks = top_attention_blocks(unet)
    level1 = [*unet.down_blocks[1].attentions, *unet.up_blocks[1].attentions]
    assert blocks == [b for t in level1 for b in t.transformer_blocks]


def test_ratios_outside_the_range_are_refused():
    with pytest.raises(ParameterError, match="token_merging"):
        GenerationParams(token_merging=0.9).resolved(TINY)
    with pytest.raises(ParameterError, match="from 0 to 0.75"):
        with token_merging(UNet(TINY.unet), -0.1):
            pass


def test_generation_is_reproducible_and_close_to_unmerged():
    model = Model.from_name(None)
    params = GenerationParams(prompt="a red circle above a blue square", steps=10, seed=5)
    plain = np.asarray(sdlab.generate(model, params).images[0], dtype=np.float32)
    first, second = (np.asarray(sdlab.generate(model, params.replace(token_merging=0.5)).images[0],
                                dtype=np.float32) for _ in range(2))
    other_seed = np.asarray(sdlab.generate(model, params.replace(seed=6)).images[0], dtype=np.float32)
    np.testing.assert_array_equal(first, second)
    # The same picture, changed: closer to the unmerged image than another seed's image is.
    assert 0 < np.abs(first - plain).mean() < np.abs(other_seed - plain).mean()
