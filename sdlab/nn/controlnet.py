"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder and middle block reads the latents plus an encoded control image
(edges, depth, pose...); 1x1 "zero convolutions" (initialised to zero in training) turn each of its skip
features and its middle output into residuals that the UNet adds to its own:

    hint (B, 3, H, W) in [0, 1] --hint encoder (3 stride-2 convs: /8)--> (B, C0, h, w) --+
    x (B, 4, h, w) --conv_in-----------------------------------------------------------> + --> encoder levels
        --> middle block;  every skip --1x1 zero conv--> ControlResiduals.skips;  middle --1x1--> .middle
    t, context, added: exactly as the UNet takes them

The `state_dict()` keys and shapes equal diffusers' `ControlNetModel` for the same configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sdlab.config import UNetConfig
from sdlab.errors import ParameterError
from sdlab.nn.layers import TimestepMLP, silu
from sdlab.nn.unet import ControlResiduals, DownLevel, MidBlock, check_inputs, time_embedding

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder of a UNet of config `unet` (its in/out channels are the latents') plus a
    hint encoder of `embedding_channels` widths for `conditioning_channels`-channel control images.

    global_pool: the residuals are averaged over space (lllyasviel's content-shuffle ControlNet was trained
    so; diffusers' global_pool_conditions); it then steers the conditional prediction only.
    channel_order: "bgr" flips the control image's channels first (some ported files were trained on BGR).
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool: bool = False
    channel_order: str = "rgb"

    def __post_init__(self):
        object.__setattr__(self, "embedding_channels", tuple(self.embedding_channels))
        if self.channel_order not in CHANNEL_ORDERS:
            raise ParameterError(f"ControlNetConfig.channel_order={self.channel_order!r}; use one of {CHANNEL_ORDERS}")
        if not self.embedding_channels or min(self.embedding_channels) < 1 or self.conditioning_channels < 1:
            raise ParameterError("ControlNetConfig: embedding_channels and conditioning_channels must be positive")

    @property
    def downscale(self) -> int:
        """How much smaller the latents are than the control image: one 2x per step of the hint encoder."""
        return 2 ** (len(self.embedding_channels) - 1)

    def replace(self, **changes) -> ControlNetConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_unet(cls, unet: UNetConfig, **options) -> ControlNetConfig:
        """A ControlNet for a UNet of config `unet` (as diffusers' ControlNetModel.from_unet: the encoder's
        config, reading 4-channel latents even beside a 9-channel inpainting UNet)."""
        return cls(unet=dataclasses.replace(unet, in_channels=4, out_channels=4), **options)


class HintEncoder(nn.Module):
    """The control image to the latents' size and the UNet's first width: conv + SiLU, then per width a
    3x3 conv and a 3x3 stride-2 conv (each + SiLU), then a 3x3 (zero) conv.
    (B, 3, H, W) -> (B, C0, H / 8, W / 8) for the usual four widths."""

    def __init__(self, in_ch: int, widths: tuple[int, ...], out_ch: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        x = silu(self.conv_in(hint))
        for conv in self.blocks:
            x = silu(conv(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """forward(x (B, 4, h, w), t (B,) or scalar, context (B, T, D), hint (B, 3, 8h, 8w) in [0, 1],
    added (B, N) for SDXL) -> ControlResiduals (skips and middle, unscaled: the caller weighs them)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        ch = u.channels
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], u.time_embed_dim)
        if u.added_condition == "text_time":
            self.add_embedding = TimestepMLP(u.added_input_dim, u.time_embed_dim)
        self.controlnet_cond_embedding = HintEncoder(cfg.conditioning_channels, cfg.embedding_channels, ch[0])
        self.down_blocks = nn.ModuleList(DownLevel(u, i, ch[max(i - 1, 0)]) for i in range(len(ch)))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in skip_channels(u))
        self.mid_block = MidBlock(u)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, hint: torch.Tensor,
                added: torch.Tensor | None = None) -> ControlResiduals:
        check_inputs(self.cfg.unet, "ControlNet", x, context, added)
        self._check_hint(x, hint)
        if self.cfg.channel_order == "bgr":
            hint = hint.flip(1)
        temb = time_embedding(self, self.cfg.unet, t, x, added)
        x = self.conv_in(x) + self.controlnet_cond_embedding(hint.to(x.dtype))  # (B, C0, h, w)
        skips = [x]
        for level in self.down_blocks:
            x, level_skips = level(x, temb, context)
            skips += level_skips
        x = self.mid_block(x, temb, context)
        residuals = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        middle = self.controlnet_mid_block(x)
        if self.cfg.global_pool:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
            middle = middle.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(skips=tuple(residuals), middle=middle)

    def _check_hint(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        f = self.cfg.downscale
        expected = (x.shape[0], self.cfg.conditioning_channels, x.shape[2] * f, x.shape[3] * f)
        if tuple(hint.shape) != expected:
            raise ParameterError(f"ControlNet: the control image must have shape {expected} (the latents' batch, "
                                 f"{f}x their size), got {tuple(hint.shape)}")


def skip_channels(cfg: UNetConfig) -> list[int]:
    """The width of each skip connection, in the encoder's order: conv_in's, then each level's ResNet
    outputs and its downsample's (all levels but the last)."""
    widths = [cfg.channels[0]]
    for level, ch in enumerate(cfg.channels):
        widths += [ch] * (cfg.layers_per_block + (level < len(cfg.channels) - 1))
    return widths
