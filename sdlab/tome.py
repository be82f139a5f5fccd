"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"): an
opt-in speedup that trades a little quality for time.

Self-attention costs O(N^2) in the number of tokens N = h * w, and at a UNet's highest-resolution attention
level many neighbouring tokens are nearly alike. Before each self-attention there, the tokens are split into
destinations (one random token per 2x2 cell) and sources (the other three); the `ratio * N` sources most
similar (cosine) to some destination are averaged into it; attention runs on the N - ratio * N tokens left;
afterwards every merged source takes its destination's output ("unmerging"), so the block's output is
(B, N, C) again. Cross-attention and the feed-forward layer see every token, as in the paper's default.

    with token_merging(model.unet, ratio=0.5):   # GenerationParams.token_merging does this in generate()
        ...

The random destinations come from a generator seeded when merging is switched on, so images stay
reproducible for a seed. The cost in quality is measured in docs/performance.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sdlab.errors import ParameterError
from sdlab.nn.layers import TransformerBlock
from sdlab.nn.unet import UNet
from sdlab.params import MAX_TOKEN_MERGING

MAX_RATIO = MAX_TOKEN_MERGING


class TokenMerger:
    """Plans, for one self-attention call, which tokens merge: `plan(tokens, (h, w))` -> (merge, unmerge)."""

    def __init__(self, ratio: float, seed: int = 0):
        self.ratio = ratio
        self.generator = torch.Generator().manual_seed(seed)

    def plan(self, tokens: torch.Tensor, size: tuple[int, int]) -> tuple[Callable, Callable]:
        """tokens: (B, N, C) with N = h * w -> merge: (B, N, C') -> (B, N - r, C'), unmerge: back to N."""
        batch, n, _ = tokens.shape
        dst = self._destinations(size).to(tokens.device)  # (Nd,) token indices
        is_dst = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        is_dst[dst] = True
        src = (~is_dst).nonzero().squeeze(1)  # (Ns,)
        r = min(int(n * self.ratio), len(src))

        metric = F.normalize(tokens.float(), dim=-1)
        similarity = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, Ns, Nd)
        best, best_dst = similarity.max(dim=-1)  # (B, Ns)
        order = best.argsort(dim=-1, descending=True)  # (B, Ns): most similar sources first
        merged, kept = src[order[:, :r]], src[order[:, r:]]  # (B, r), (B, Ns - r) token indices
        into = best_dst.gather(1, order[:, :r])  # (B, r): which destination each merged source joins

        def merge(x: torch.Tensor) -> torch.Tensor:
            c = x.shape[-1]
            pooled = x[:, dst].scatter_reduce(1, _rows(into, c), x.gather(1, _rows(merged, c)), "mean")
            return torch.cat([x.gather(1, _rows(kept, c)), pooled], dim=1)  # (B, Ns - r + Nd, C)

        def unmerge(y: torch.Tensor) -> torch.Tensor:
            c = y.shape[-1]
            y_kept, y_dst = y[:, : kept.shape[1]], y[:, kept.shape[1]:]
            out = y.new_empty(batch, n, c)
            out[:, dst] = y_dst
            out.scatter_(1, _rows(kept, c), y_kept)
            out.scatter_(1, _rows(merged, c), y_dst.gather(1, _rows(into, c)))
            return out

        return merge, unmerge

    def _destinations(self, size: tuple[int, int]) -> torch.Tensor:
        """One token index per whole 2x2 cell, at a random place in the cell; leftover rows/columns are sources."""
        h, w = size
        rows, cols = h // 2, w // 2
        pick = torch.randint(4, (rows, cols), generator=self.generator)
        y = torch.arange(rows)[:, None] * 2 + pick // 2
        x = torch.arange(cols)[None, :] * 2 + pick % 2
        return (y * w + x).flatten()


def _rows(index: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, K) token indices -> (B, K, C) for gather/scatter along the token axis."""
    return index[..., None].expand(-1, -1, channels)


def top_attention_blocks(unet: UNet) -> list[TransformerBlock]:
    """The transformer blocks at the highest-resolution level that has attention (the most tokens)."""
    unet = getattr(unet, "_orig_mod", unet)
    levels = unet.cfg.attention_levels
    if not any(levels):
        return []
    level = levels.index(True)
    down, up = unet.down_blocks[level], unet.up_blocks[len(levels) - 1 - level]
    return [block for part in (down, up) for spatial in part.attentions for block in spatial.transformer_blocks]


@contextmanager
def token_merging(unet: UNet, ratio: float, seed: int = 0) -> Iterator[None]:
    """Merge `ratio` of the tokens before the top level's self-attention while the context is open."""
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ParameterError(f"token merging ratio must be from 0 to {MAX_RATIO}, got {ratio}")
    blocks = top_attention_blocks(unet) if ratio > 0 else []
    merger = TokenMerger(ratio, seed)
    for block in blocks:
        block.token_merger = merger
    try:
        yield
    finally:
        for block in blocks:
            block.token_merger = None
