"""The conditional UNet of Stable Diffusion 1.x/2.x (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"; the UNet itself after Ronneberger et al. 2015 and Ho et al. 2020).

    x (B, in, h, w) --conv_in--> down levels --> middle --> up levels (+ skips) --norm, SiLU, conv_out--> (B, out, h, w)
    t (B,) --sinusoid--> MLP --> added inside every ResNet block
    context (B, T, D) --> cross-attention inside every spatial transformer
    added (B, P + N) (SDXL) --pooled text, sinusoids of N numbers--> MLP --> added to the time MLP's output

SDXL's UNet (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis") is the same network with per-level transformer depths and head counts, and the `added`
conditioning on the pooled text embedding and the image-size numbers ("micro-conditioning").

The `state_dict()` keys and shapes equal diffusers' `UNet2DConditionModel` for the same configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdlab.config import UNetConfig
from sdlab.errors import ParameterError
from sdlab.nn.layers import Downsample, ResBlock, SpatialTransformer, TimestepMLP, Upsample, silu, timestep_embedding


@dataclass(frozen=True)
class ControlResiduals:
    """What control networks add to a UNet pass: the one place where ControlNet and T2I-Adapter act.

    skips: one tensor per skip connection, in the order the encoder makes them (conv_in's output first, then
        each level's), each the skip's shape (B, C_i, h_i, w_i) or (B, C_i, 1, 1) (globally pooled); added to
        the skips before the decoder reads them (ControlNet, Zhang et al. 2023).
    middle: (B, C_last, h', w'), added to the middle block's output (ControlNet).
    encoder: per encoder level in order (and one more for the middle block, when there is one), added inside
        the encoder itself (T2I-Adapter, Mou et al. 2023; diffusers' down_intrablock_additional_residuals).
    Any part may be None. Several control networks sum their residuals (`+`).
    """

    skips: tuple[torch.Tensor, ...] | None = None
    middle: torch.Tensor | None = None
    encoder: tuple[torch.Tensor, ...] | None = None

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        return ControlResiduals(*(_sum_parts(a, b) for a, b in zip(self._parts(), other._parts())))

    def _parts(self):
        return self.skips, self.middle, self.encoder

    def encoder_at(self, level: int) -> torch.Tensor | None:
        return self.encoder[level] if self.encoder is not None and level < len(self.encoder) else None

    def add_to_skips(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """skips + their residuals; only the first len(skips) are used (DeepCache's shallow calls have only
        the first level's skips: the others acted through the cached deep features)."""
        if self.skips is None:
            return skips
        return [s + r for s, r in zip(skips, self.skips)] + skips[len(self.skips):]


def _sum_parts(a, b):
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, tuple):
        if len(a) != len(b):
            raise ParameterError(f"control residuals of different lengths ({len(a)} and {len(b)}) cannot be summed")
        return tuple(x + y for x, y in zip(a, b))
    return a + b


def _transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels,
        heads=cfg.heads_at(level),
        context_dim=cfg.context_dim,
        depth=cfg.depth_at(level),
        groups=cfg.norm_groups,
        linear_projection=cfg.use_linear_projection,
        upcast=cfg.upcast_attention,
    )


def _resblock(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps)


class DownLevel(nn.Module):
    """Encoder level `level`: ResNet blocks, each followed by a transformer if the level has attention, then a
    2x downsample unless it is the last level. Returns every intermediate output as a skip connection."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int):
        super().__init__()
        out_ch = cfg.channels[level]
        n = cfg.layers_per_block
        with_attention = cfg.attention_levels[level]
        self.attentions = nn.ModuleList(_transformer(cfg, out_ch, level) for _ in range(n) if with_attention)
        self.resnets = nn.ModuleList(_resblock(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        is_last = level == len(cfg.channels) - 1
        self.downsamplers = nn.ModuleList([] if is_last else [Downsample(out_ch)])

    def forward(self, x, temb, context, downsample: bool = True, residual: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`residual` (a T2I-Adapter feature) is added where diffusers' UNet adds it: after the last transformer
        of a level with attention (before its skip and downsample), else to the level's output."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
                if residual is not None and i == len(self.resnets) - 1:
                    x = x + residual
            skips.append(x)
        for down in self.downsamplers if downsample else ():
            x = down(x)
            skips.append(x)
        if residual is not None and not self.attentions and (downsample or not self.downsamplers):
            x = x + residual
            skips[-1] = x  # diffusers adds it in place: the skip is the same tensor
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: ResNet block, spatial transformer, ResNet block, at the deepest width."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch = cfg.channels[-1]
        self.attentions = nn.ModuleList([_transformer(cfg, ch, len(cfg.channels) - 1)])
        self.resnets = nn.ModuleList([_resblock(cfg, ch, ch), _resblock(cfg, ch, ch)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpLevel(nn.Module):
    """Decoder mirror of encoder level `level`: layers_per_block + 1 ResNet blocks, each reading the previous
    output concatenated with one skip connection, optional transformers, then a 2x upsample unless level 0."""

    def __init__(self, cfg: UNetConfig, level: int):
        super().__init__()
        out_ch = cfg.channels[level]
        prev_ch = cfg.channels[min(level + 1, len(cfg.channels) - 1)]  # output of the deeper level (or middle)
        n = cfg.layers_per_block + 1
        # Skips of this level come from its encoder ResNets (out_ch), the last from the level above's
        # downsampler (or conv_in for level 0).
        skip_ch = [out_ch] * (n - 1) + [cfg.channels[max(level - 1, 0)]]
        with_attention = cfg.attention_levels[level]
        self.attentions = nn.ModuleList(_transformer(cfg, out_ch, level) for _ in range(n) if with_attention)
        self.resnets = nn.ModuleList(
            _resblock(cfg, (prev_ch if i == 0 else out_ch) + skip_ch[i], out_ch) for i in range(n)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if level > 0 else [])

    def forward(self, x, skips: list[torch.Tensor], temb, context, out_size=None) -> torch.Tensor:
        """`skips` in the order the encoder produced them; `out_size` (H, W) for the upsample, if any."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C, H, W)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, out_size)
        return x


class UNet(nn.Module):
    """Predicts the noise (or v) in latents `x` at timesteps `t` given text `context`.

    forward(x: (B, in_channels, h, w), t: (B,) or scalar, possibly fractional, context: (B, T, context_dim),
            added: (B, cfg.added_dim) for a config with an added_condition, else None)
        -> (B, out_channels, h, w)

    `added` ("text_time", SDXL) is the pooled text embedding (B, cfg.added_pooled_dim) followed by the
    cfg.added_time_ids plain numbers (SDXL base: original height, width, crop top, left, target height,
    width; the refiner: the same without the target size, then the aesthetic score). It is what diffusers
    passes as added_cond_kwargs, torch.cat([text_embeds, time_ids], dim=1); the sinusoidal features of the
    numbers are computed here.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], cfg.time_embed_dim)
        if cfg.added_condition == "text_time":
            self.add_embedding = TimestepMLP(cfg.added_input_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(DownLevel(cfg, i, ch[max(i - 1, 0)]) for i in range(len(ch)))
        self.mid_block = MidBlock(cfg)
        self.up_blocks = nn.ModuleList(UpLevel(cfg, i) for i in reversed(range(len(ch))))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                added: torch.Tensor | None = None, control: ControlResiduals | None = None) -> torch.Tensor:
        return self.forward_with_features(x, t, context, added=added, control=control)[0]

    def forward_with_features(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                              deep: torch.Tensor | None = None, added: torch.Tensor | None = None,
                              control: ControlResiduals | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and the deep features: what the deeper levels hand the last up level, (B, C1, h, w).

        Given `deep` (from an earlier call at a nearby timestep), only the first encoder level and the last
        decoder level run, with `deep` standing in for everything below them: DeepCache (Ma et al. 2023),
        which relies on the deep features changing slowly from one sampling step to the next. `control`
        residuals then act on the first level's skips only; the rest of them came in with `deep`.
        """
        check_inputs(self.cfg, "UNet", x, context, added)
        control = control or ControlResiduals()
        temb = time_embedding(self, self.cfg, t, x, added)
        x = self.conv_in(x)
        skips = [x]
        if deep is None:
            for i, level in enumerate(self.down_blocks):
                x, level_skips = level(x, temb, context, residual=control.encoder_at(i))
                skips += level_skips
            x = self.mid_block(x, temb, context)
            x = _add_middle(x, control, len(self.down_blocks))
            skips = control.add_to_skips(skips)
            for level in self.up_blocks[:-1]:
                n = len(level.resnets)
                level_skips, skips = skips[-n:], skips[:-n]
                # Upsample to the next skip's size rather than 2x, so odd sizes round-trip.
                x = level(x, level_skips, temb, context, out_size=skips[-1].shape[-2:])
            deep = x
        else:
            skips += self.down_blocks[0](x, temb, context, downsample=False, residual=control.encoder_at(0))[1]
            skips = control.add_to_skips(skips)
        x = self.up_blocks[-1](deep, skips, temb, context)
        return self.conv_out(silu(self.conv_norm_out(x))), deep

def _add_middle(x: torch.Tensor, control: ControlResiduals, levels: int) -> torch.Tensor:
    """The middle block's output plus a T2I-Adapter feature left after the levels' (SDXL's adapter has one
    more feature than levels; diffusers adds it when the shapes match) and the ControlNet middle residual."""
    extra = control.encoder_at(levels)
    if extra is not None and extra.shape == x.shape:
        x = x + extra
    return x if control.middle is None else x + control.middle


def time_embedding(net: nn.Module, cfg: UNetConfig, t: torch.Tensor | float, x: torch.Tensor,
                   added: torch.Tensor | None) -> torch.Tensor:
    """SiLU(time MLP(sinusoids of t) [+ added-condition MLP]), (B, time_embed_dim): what every ResNet block
    of `net` (a UNet, or a ControlNet's copy of its encoder) reads. Every ResNet block applies SiLU to it
    first: done once here."""
    t = _batch_timesteps(t, x.shape[0], x.device)  # (B,)
    emb = timestep_embedding(t, cfg.channels[0]).to(x.dtype)  # (B, C0)
    temb = net.time_embedding(emb)  # (B, 4 * C0)
    if added is not None:
        temb = temb + net.add_embedding(_added_features(cfg, added).to(x.dtype))
    return silu(temb)


def _added_features(cfg: UNetConfig, added: torch.Tensor) -> torch.Tensor:
    """(B, P + N): pooled text, N numbers -> (B, P + N * added_time_dim): pooled text, each number's
    sinusoidal features in turn (cosines first, as for the timesteps)."""
    pooled, numbers = added[:, : cfg.added_pooled_dim], added[:, cfg.added_pooled_dim :]
    features = timestep_embedding(numbers.reshape(-1), cfg.added_time_dim)  # (B * N, added_time_dim)
    return torch.cat([pooled, features.reshape(added.shape[0], -1).to(pooled.dtype)], dim=1)


def check_inputs(cfg: UNetConfig, who: str, x: torch.Tensor, context: torch.Tensor, added: torch.Tensor | None,
                 ) -> None:
    """Raise ParameterError naming the input of `who` (a UNet or ControlNet of config `cfg`) whose shape
    does not fit the config."""
    if cfg.added_condition is None and added is not None:
        raise ParameterError(f"{who}: got an added condition but UNetConfig.added_condition is null; "
                             "this network takes none (pass added=None)")
    if cfg.added_condition is not None and (
        added is None or added.ndim != 2 or added.shape != (x.shape[0], cfg.added_dim)
    ):
        got = "none" if added is None else str(tuple(added.shape))
        raise ParameterError(
            f"{who}: UNetConfig.added_condition={cfg.added_condition!r} needs `added` of shape "
            f"({x.shape[0]}, {cfg.added_dim}) (pooled text {cfg.added_pooled_dim} + {cfg.added_time_ids} "
            f"numbers), got {got}"
        )
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ParameterError(
            f"{who}: latents must have shape (B, {cfg.in_channels}, h, w) for UNetConfig.in_channels="
            f"{cfg.in_channels}, got {tuple(x.shape)}"
        )
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
        raise ParameterError(
            f"{who}: context must have shape ({x.shape[0]}, T, {cfg.context_dim}) (batch of the latents, "
            f"UNetConfig.context_dim), got {tuple(context.shape)}"
        )


def _batch_timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar, (1,) or (B,) timestep (int or float) -> a (B,) tensor on `device`."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ParameterError(f"UNet: timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.expand(batch)


def _check_config(cfg: UNetConfig) -> None:
    last = len(cfg.channels) - 1
    for level, ch in enumerate(cfg.channels):
        if ch % cfg.norm_groups:
            raise ParameterError(
                f"UNetConfig.channels[{level}]={ch} is not divisible by norm_groups={cfg.norm_groups}"
            )
        has_attention = cfg.attention_levels[level] or level == last  # the middle block always attends
        heads = cfg.heads_at(level)
        if has_attention and (heads < 1 or ch % heads or (cfg.head_dim is not None and ch % cfg.head_dim)):
            raise ParameterError(
                f"UNetConfig.channels[{level}]={ch} does not split into attention heads "
                f"(num_heads={cfg.num_heads}, head_dim={cfg.head_dim}); use a multiple of the head count/size"
            )
    if cfg.layers_per_block < 1 or min(cfg.depth_at(level) for level in range(len(cfg.channels))) < 1:
        raise ParameterError(
            f"UNetConfig: layers_per_block ({cfg.layers_per_block}) and transformer_depth "
            f"({cfg.transformer_depth}) must be at least 1"
        )
