"""Frozen, typed configurations of the Stable Diffusion networks, with named presets.

One dataclass per network plus `ModelConfig`, which bundles them with what the sampler needs to know
(the training noise schedule and what the UNet predicts). Field names say what they mean; where the
diffusers `config.json` uses another name, `sdlab.checkpoints.configs` translates.

Presets: SD15, SD15_INPAINT, SD21_BASE (eps, 512), SD21 (v, 768), SD2_INPAINT, and TINY (a few-hundred-
thousand-parameter model of the same structure for tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Activation = Literal["quick_gelu", "gelu"]
Prediction = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["scaled_linear", "linear"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP-style causal text transformer (OpenAI CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x).

    `num_layers` counts the layers that exist in the network. SD 2.x checkpoints in the diffusers layout
    keep 23 of OpenCLIP's 24 layers (SD 2 conditions on the penultimate layer, so the last is dropped).
    """

    vocab_size: int = 49408
    max_length: int = 77  # number of positions, including the start and end tokens
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Token id that pads a prompt up to max_length: <|endoftext|> (49407) for SD 1.x, "!" (0) for SD 2.x.
    pad_token_id: int = 49407


@dataclass(frozen=True)
class UNetConfig:
    """The conditional UNet of latent diffusion (Rombach et al. 2022), as Stable Diffusion 1.x/2.x use it.

    Level i of the encoder has `layers_per_block` ResNet blocks at `channels[i]` channels, each followed by a
    spatial transformer (self-attention, cross-attention to the text, feed-forward) when
    `attention_levels[i]` is true, then a 2x downsample (except the last level). The decoder mirrors it with
    one extra block per level. The middle block is ResNet, transformer, ResNet.

    Attention heads: give either `num_heads` (SD 1.x: 8 heads at every level, so the head size grows with
    the width) or `head_dim` (SD 2.x: heads of 64 channels). diffusers calls the former, confusingly,
    `attention_head_dim`.
    """

    in_channels: int = 4  # 9 for inpainting models: latents (4) + mask (1) + masked-image latents (4)
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    context_dim: int = 768
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: int = 1
    use_linear_projection: bool = False  # SD 2.x: Linear instead of 1x1 conv around the transformer
    upcast_attention: bool = False  # SD 2.1: compute attention scores in fp32 under fp16
    norm_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(
                f"UNetConfig: channels has {len(self.channels)} levels but attention_levels has "
                f"{len(self.attention_levels)}; give one flag per level"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: give exactly one of num_heads and head_dim")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def heads_at(self, level: int) -> int:
        """Number of attention heads in the transformers of encoder level `level` (and its mirror)."""
        if self.num_heads is not None:
            return self.num_heads
        return self.channels[level] // self.head_dim


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: an encoder to a diagonal Gaussian over latents, and a decoder back to pixels.

    The latents that diffusion works on are `scaling_factor * (z - shift_factor)`, chosen at training time so
    that they have roughly unit variance.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule the model was trained with (DDPM, Ho et al. 2020)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    # How sampling picks timesteps out of the training ones (diffusers' scheduler config): SD ships
    # "leading" spacing with an offset of 1.
    timestep_spacing: Literal["leading", "linspace", "trailing"] = "leading"
    steps_offset: int = 1
    # Rescale the betas to zero terminal SNR (Lin et al. 2023); models trained that way need it to sample.
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Stable Diffusion model and sample from it."""

    name: str
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "epsilon"
    default_size: int = 512  # the image side the model was trained at
    default_guidance: float = 7.0  # the CFG scale generation uses when none is given

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_OPENCLIP_H = TextEncoderConfig(
    width=1024, num_layers=23, num_heads=16, mlp_width=4096, activation="gelu", pad_token_id=0
)
_SD2_UNET = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_projection=True)

SD15 = ModelConfig(name="sd15")
SD15_INPAINT = ModelConfig(name="sd15-inpaint", unet=UNetConfig(in_channels=9))
SD21_BASE = ModelConfig(name="sd21-base", text_encoder=_OPENCLIP_H, unet=_SD2_UNET)
SD21 = ModelConfig(
    name="sd21",
    text_encoder=_OPENCLIP_H,
    unet=dataclasses.replace(_SD2_UNET, upcast_attention=True),
    prediction="v_prediction",
    default_size=768,
)
SD2_INPAINT = ModelConfig(
    name="sd2-inpaint", text_encoder=_OPENCLIP_H, unet=dataclasses.replace(_SD2_UNET, in_channels=9)
)

# A model of SD's structure small enough for unit tests (runs in milliseconds on a CPU).
TINY = ModelConfig(
    name="tiny",
    text_encoder=TextEncoderConfig(width=32, num_layers=3, num_heads=4, mlp_width=64),
    unet=UNetConfig(
        channels=(32, 64), attention_levels=(True, False), context_dim=32, num_heads=None, head_dim=8,
        norm_groups=8,
    ),
    vae=VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8),
    default_size=64,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD15_INPAINT, SD21_BASE, SD21, SD2_INPAINT, TINY)}
