"""Building blocks shared by the UNet and the VAE of Stable Diffusion.

Module and attribute names (`norm1`, `to_q`, `to_out.0`, `ff.net.2`, ...) are chosen so that the networks'
`state_dict()` keys are exactly those of the diffusers checkpoints, which lets a checkpoint load with no key
mapping. Where a name looks odd (a list holding a single layer), that is the reason.

Papers: ResNet blocks with time embedding (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"),
the spatial transformer (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"), attention (Vaswani et al. 2017), GEGLU (Shazeer 2020, "GLU Variants Improve Transformer").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sdlab.errors import ParameterError

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU that works in place when no gradient is recorded (inference), saving one activation-sized buffer.

    Only ever applied to freshly computed tensors (a norm's output), so overwriting them is safe.
    """
    return F.silu(x, inplace=not torch.is_grad_enabled())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first, as Stable Diffusion uses.

    t: (B,) -> (B, dim) in float32. Frequencies are max_period ** (-i / (dim // 2)), i = 0 .. dim // 2 - 1
    (Vaswani et al. 2017; the cos-then-sin order and zero frequency shift are SD's convention).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * -math.log(max_period) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Two-layer MLP lifting the sinusoidal timestep embedding to the width the ResNet blocks read."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, with an optional time embedding added in between, plus a skip.

    The skip is a 1x1 conv when the channel count changes. `time_dim=None` gives the VAE's variant.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_ch) if time_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_ch, H, W), temb: SiLU of the time embedding (B, time_dim) or None -> (B, out_ch, H, W)."""
        h = self.conv1(silu(self.norm1(x)))  # (B, out_ch, H, W)
        if self.time_emb_proj is not None:
            # The caller applies SiLU to the embedding once for all blocks.
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)  # (B, heads, T, head_dim)


MAX_CHUNK_WORK = 2**34  # batch x queries x keys x width of one attention call: ~70 GFLOP, ~1 s on 2 cores


def query_chunk(batch: int, keys: int, width: int) -> int:
    """How many queries attend in one call so that batch x queries x keys x width stays under MAX_CHUNK_WORK
    (all of them at SD's usual sizes: a batch of 2 x 4096 tokens of 320 or 512 channels, as at 512x512)."""
    return max(16, MAX_CHUNK_WORK // max(1, batch * keys * width))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, T, heads * head_dim) tensors, returning the same layout.

    `upcast` computes in float32 when inputs are fp16/bf16 (SD 2.1 overflows in half precision otherwise).
    """
    batch, q_len, inner = q.shape
    dtype = q.dtype
    if upcast and dtype in _HALF_DTYPES:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return out.transpose(1, 2).reshape(batch, q_len, inner).to(dtype)  # (B, Tq, heads * head_dim)


@dataclass(frozen=True, eq=False)
class IPAttention:
    """IP-Adapter's decoupled cross-attention for one cross-attention layer (Ye et al. 2023, eq. 5):
    out = Attn(q, K_text, V_text) + scale * Attn(q, to_k(image), to_v(image)), before the output projection.

    The image tokens ride at the end of the context, (B, T_text + tokens, D), so that the networks keep their
    signature; `split` takes them off. Not an nn.Module on purpose: set as `Attention.ip`, it is not
    registered as a submodule, so the UNet's state_dict(), .to() and parameters() stay those of the UNet
    (`sdlab.nn.ip_adapter.ip_adapter_attention` installs and removes it; the adapter owns the layers).
    """

    to_k: nn.Module  # Linear D -> inner, no bias
    to_v: nn.Module
    tokens: int  # N: how many trailing context tokens are image tokens
    scale: float

    def split(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T_text + N, D) -> text (B, T_text, D), image (B, N, D)."""
        if context.shape[1] <= self.tokens:
            raise ParameterError(
                f"IP-Adapter attention expects the context to end with {self.tokens} image tokens after the "
                f"text tokens; got a context of {context.shape[1]} tokens (append the image tokens to the text "
                f"context along the token axis)"
            )
        return context[:, : -self.tokens], context[:, -self.tokens :]


class Attention(nn.Module):
    """Multi-head attention of `query_dim`-wide tokens to themselves or to a context (cross-attention)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # a list only for the checkpoint key "to_out.0"
        self.ip: IPAttention | None = None  # IP-Adapter's image branch, cross-attention only (set by ip_adapter)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim), context: (B, T, context_dim) or None for self-attention -> (B, N, query_dim).

        Long sequences attend in chunks of queries (`query_chunk`): each query's softmax still sees every
        key, so the result is the same, but one call's work and memory stay bounded and the call returns
        to Python between chunks, where a generation can be stopped (sdlab.interrupts)."""
        kv = x if context is None else context
        ip_kv = None
        if self.ip is not None and context is not None:
            kv, image = self.ip.split(context)  # (B, T_text, D), (B, N, D)
            ip_kv = (self.ip.to_k(image), self.ip.to_v(image)) if self.ip.scale != 0 else None  # (B, N, inner)
        k, v = self.to_k(kv), self.to_v(kv)  # (B, T, inner)
        chunk = query_chunk(k.shape[0], k.shape[1], k.shape[2])
        if chunk >= x.shape[1]:
            return self._attend(x, k, v, ip_kv)
        return torch.cat([self._attend(part, k, v, ip_kv) for part in x.split(chunk, dim=1)], dim=1)

    def _attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ip_kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Queries of x (B, n, query_dim) attend to k, v (and to IP-Adapter's image keys and values)."""
        q = self.to_q(x)  # (B, n, inner)
        out = attention(q, k, v, self.heads, self.upcast)
        if ip_kv is not None:
            out = out + self.ip.scale * attention(q, *ip_kv, self.heads, self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear projection to twice the width, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of a transformer block; `net` is (GEGLU, dropout slot, Linear) for key names."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.token_merger = None  # opt-in token merging before self-attention (set by sdlab.tome)

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, H*W, dim), context: (B, T, context_dim) -> (B, H*W, dim); size = (H, W)."""
        h = self.norm1(x)
        if self.token_merger is not None and size is not None:
            merge, unmerge = self.token_merger.plan(h, size)
            x = x + unmerge(self.attn1(merge(h)))  # attention over fewer tokens, then one output per token
        else:
            x = x + self.attn1(h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map, as tokens (Rombach et al. 2022, sec. 3.3).

    GroupNorm, then a projection in (a 1x1 conv for SD 1.x, a Linear on the tokens for SD 2.x), `depth`
    transformer blocks, a projection out, and a residual connection around it all.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        # SD 2.x projects the tokens with a Linear, SD 1.x the feature map with a 1x1 conv: the same map.
        project = nn.Linear if linear_projection else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = project(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, T, context_dim) -> (B, C, H, W)."""
        h = self._project_in(self.norm(x))  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context, size=x.shape[-2:])
        return x + self._project_out(h, x.shape)

    def _project_in(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W, C) tokens, projected before or after flattening."""
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).flatten(1, 2)  # a copy from NCHW, free from channels_last
        return self.proj_in(h) if self.linear_projection else h

    def _project_out(self, h: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, H*W, C) tokens -> (B, C, H, W), projected before or after unflattening."""
        batch, channels, height, width = shape
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.view(batch, height, width, channels).permute(0, 3, 1, 2)  # channels_last strides, no copy
        return h if self.linear_projection else self.proj_out(h)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, with its own GroupNorm and a residual.

    The VAE's mid-block attention. Unlike the UNet's attention, its q/k/v projections have biases.
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)  # (B, H*W, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Halves height and width with a stride-2 3x3 conv.

    `asymmetric_pad=True` is the VAE encoder's variant: pad one zero row/column at the bottom/right only,
    then convolve without padding (as the original CompVis VAE was trained).
    """

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv; `size` (H, W) overrides the default 2x (for odd sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
