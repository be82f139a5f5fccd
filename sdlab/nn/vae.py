"""The KL-regularised autoencoder of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.1; the VAE of Kingma & Welling 2014).

    image (B, 3, H, W) in [-1, 1] --encoder--> quant_conv --> mean, logvar (B, C_lat, H/f, W/f)
    latent z (B, C_lat, h, w) --post_quant_conv--> decoder --> image (B, 3, h*f, w*f)

Latents here are UNSCALED: the caller applies the latent format (`sdlab.families.LatentFormat`). The
`state_dict()` keys and shapes equal diffusers' `AutoencoderKL` for the same configuration.
"""

from __future__ import annotations

import torch
from torch import nn

from sdlab.config import VAEConfig
from sdlab.errors import ParameterError
from sdlab.nn.layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, silu

_EPS = 1e-6  # every GroupNorm of the VAE


def _resblock(cfg: VAEConfig, in_ch: int, out_ch: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, time_dim=None, groups=cfg.norm_groups, eps=_EPS)


class EncoderLevel(nn.Module):
    """`layers_per_block` ResNet blocks, then a 2x downsample (padded bottom/right) unless it is the last level."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(_resblock(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, asymmetric_pad=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderLevel(nn.Module):
    """`layers_per_block + 1` ResNet blocks, then a 2x nearest upsample and conv unless it is the last level."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(_resblock(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResNet block, single-head self-attention over all pixels, ResNet block."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, cfg.norm_groups, eps=_EPS)])
        self.resnets = nn.ModuleList([_resblock(cfg, ch, ch), _resblock(cfg, ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): the Gaussian's mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(cfg, ch[max(i - 1, 0)], ch[i], downsample=i < last) for i in range(len(ch))
        )
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.channels))  # deepest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, ch[0])
        self.up_blocks = nn.ModuleList(
            DecoderLevel(cfg, ch[max(i - 1, 0)], ch[i], upsample=i < len(ch) - 1) for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """AutoencoderKL: `encode` an image to a diagonal Gaussian over latents, `decode` latents to an image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> (mean, logvar), each
        (B, latent_channels, H/f, W/f). logvar is clamped to [-30, 20] as the reference does."""
        self._check_image(x)
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * latent_channels, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w), unscaled -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ParameterError(
                f"VAE.decode: latents must have shape (B, {self.cfg.latent_channels}, h, w) for "
                f"VAEConfig.latent_channels={self.cfg.latent_channels}, got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    @staticmethod
    def sample_latent(
        mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw z = mean + std * eps, eps ~ N(0, I) from `generator` (the reparameterisation trick)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def _check_image(self, x: torch.Tensor) -> None:
        f = self.cfg.downscale
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ParameterError(
                f"VAE.encode: images must have shape (B, {self.cfg.in_channels}, H, W) with H and W multiples "
                f"of {f} (VAEConfig.in_channels, VAEConfig.downscale), got {tuple(x.shape)}"
            )


def _check_config(cfg: VAEConfig) -> None:
    for level, ch in enumerate(cfg.channels):
        if ch % cfg.norm_groups:
            raise ParameterError(
                f"VAEConfig.channels[{level}]={ch} is not divisible by norm_groups={cfg.norm_groups}"
            )
    if cfg.layers_per_block < 1:
        raise ParameterError(f"VAEConfig.layers_per_block={cfg.layers_per_block} must be at least 1")
