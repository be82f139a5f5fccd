"""Frozen, typed configurations of the Stable Diffusion networks, with named presets.

One dataclass per network plus `ModelConfig`, which bundles them with what the sampler needs to know
(the training noise schedule and what the UNet predicts). Field names say what they mean; where the
diffusers `config.json` uses another name, `sdlab.checkpoints.configs` translates.

The presets (SD15, SD15_INPAINT, SD21_BASE (eps, 512), SD21 (v, 768), SD2_INPAINT, and TINY, a few-hundred-
thousand-parameter model of the same structure for tests) belong to their families (`sdlab.families`);
`ModelConfig.family` names the family a config is of.

Every config checks its fields when it is made (types, `SIZE_LIMITS`, and the rules that tie fields together,
such as channels being a multiple of the GroupNorm groups) and raises `ParameterError` naming the field, so
that no config (typed in, or read from a file) can make sdlab build networks of unbounded size. The error
messages never repeat the offending value: configs are often read from files whose content must not leak.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ParameterError

Activation = Literal["quick_gelu", "gelu"]
Prediction = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["scaled_linear", "linear"]
AddedCondition = Literal["text_time"]  # SDXL: pooled text embedding + Fourier features of size numbers

# Sanity bounds, (low, high) inclusive, by kind of size. Each leaves a wide margin around what released SD 1.x,
# SD 2.x and SDXL models use (in the comments), while keeping the largest network sdlab would build on the
# meta device to seconds and a few hundred MB.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "levels": (1, 8),  # resolution levels of the UNet and VAE: SD 4, SDXL 3
    "image_channels": (1, 64),  # UNet in/out (4, inpainting 9), VAE in/out (3) and latent channels (4)
    "channels": (1, 8192),  # block widths: SD's UNet 320..1280, VAE 128..512
    "layers_per_block": (1, 8),  # SD and SDXL 2
    "transformer_depth": (1, 16),  # SD 1, SDXL up to 10
    "added_input_dim": (1, 65536),  # SDXL base 2816 (1280 pooled + 6 x 256), refiner 2560 (1280 + 5 x 256)
    "added_time_ids": (1, 16),  # SDXL base 6 (original size, crop, target size), refiner 5 (+ aesthetic score)
    "added_time_dim": (1, 4096),  # SDXL 256
    "context_dim": (1, 8192),  # SD 1.x 768, SD 2.x 1024, SDXL 2048
    "num_heads": (1, 256),  # SD 1.x 8, SD 2.x and SDXL 5..20
    "head_dim": (1, 1024),  # SD 2.x 64
    "norm_groups": (1, 1024),  # 32
    "vocab_size": (1, 1 << 20),  # CLIP 49408
    "max_length": (1, 4096),  # CLIP 77
    "width": (1, 16384),  # CLIP ViT-L 768, OpenCLIP ViT-H 1024, ViT-bigG 1280
    "num_layers": (1, 128),  # 12, 23, 32
    "mlp_width": (1, 65536),  # 3072, 4096, 5120
    "projection_dim": (1, 16384),  # SDXL's OpenCLIP ViT-bigG text projection 1280
    "num_train_timesteps": (1, 100_000),  # 1000
    "default_size": (8, 16384),  # 512, 768, 1024
}
MAX_SCALE = 1000.0  # VAE scaling/shift factors: SD 0.18215, SDXL 0.13025, SD3 1.5305 (shift 0.0609)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP-style causal text transformer (OpenAI CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x,
    both of them for SDXL, whose second one is OpenCLIP ViT-bigG/14).

    `num_layers` counts the layers that exist in the network. SD 2.x checkpoints in the diffusers layout
    keep 23 of OpenCLIP's 24 layers (SD 2 conditions on the penultimate layer, so the last is dropped).

    `projection_dim` adds the text projection (a bias-free Linear width -> projection_dim, applied to the
    pooled end-of-text state) that SDXL's second encoder has; None, as for SD 1.x/2.x, leaves it out.
    `eos_token_id` says how the pooled output finds the end-of-text token, as transformers does: None
    takes the position of the largest id in each prompt (<|endoftext|>, 49407, is the largest CLIP id;
    transformers' rule for configs that say eos_token_id 2, as the SD and SDXL ones do); an id takes the
    first position holding it (transformers' rule for any other eos_token_id).
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
    projection_dim: int | None = None  # SDXL's second encoder: 1280
    eos_token_id: int | None = None  # None: the end-of-text token is the largest id (see above)

    def __post_init__(self):
        _check_ints(self, vocab_size="vocab_size", max_length="max_length", width="width",
                    num_layers="num_layers", num_heads="num_heads", mlp_width="mlp_width")
        if self.projection_dim is not None:
            _check_ints(self, projection_dim="projection_dim")
        _check_number(self, "layer_norm_eps", 0.0, 1.0)
        self._check_token_id("pad_token_id")
        if self.eos_token_id is not None:
            self._check_token_id("eos_token_id")
        if self.width % self.num_heads:
            raise ParameterError("TextEncoderConfig.width must be a multiple of num_heads (an equal share per head)")

    def _check_token_id(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or not 0 <= value < self.vocab_size:
            raise ParameterError(f"TextEncoderConfig.{name} must be a token id from 0 to vocab_size - 1{_got(value)}")


@dataclass(frozen=True)
class UNetConfig:
    """The conditional UNet of latent diffusion (Rombach et al. 2022), as Stable Diffusion 1.x/2.x use it.

    Level i of the encoder has `layers_per_block` ResNet blocks at `channels[i]` channels, each followed by a
    spatial transformer (self-attention, cross-attention to the text, feed-forward) when
    `attention_levels[i]` is true, then a 2x downsample (except the last level). The decoder mirrors it with
    one extra block per level. The middle block is ResNet, transformer, ResNet.

    Attention heads: give either `num_heads` (SD 1.x: 8 heads at every level, so the head size grows with
    the width; SDXL: one count per level, 5/10/20) or `head_dim` (SD 2.x: heads of 64 channels). diffusers
    calls the former, confusingly, `attention_head_dim`. `transformer_depth` (blocks per spatial transformer)
    is likewise one number for all levels or one per level (SDXL base: 1, 2, 10). Per-level values are per
    encoder level; its decoder mirror and, for the last level, the middle block use the same.

    SDXL adds `added_condition="text_time"`: the network also reads a (B, added_input_dim -
    added_time_ids * added_time_dim + added_time_ids) vector, a pooled text embedding followed by
    `added_time_ids` plain numbers (image sizes, crop, aesthetic score); each number becomes `added_time_dim`
    sinusoidal features, and an MLP from the resulting `added_input_dim` values is added to the time embedding.
    """

    in_channels: int = 4  # 9 for inpainting models: latents (4) + mask (1) + masked-image latents (4)
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    context_dim: int = 768
    num_heads: int | tuple[int, ...] | None = 8  # one count, or one per level
    head_dim: int | None = None
    transformer_depth: int | tuple[int, ...] = 1  # one depth, or one per level
    use_linear_projection: bool = False  # SD 2.x: Linear instead of 1x1 conv around the transformer
    upcast_attention: bool = False  # SD 2.1: compute attention scores in fp32 under fp16
    norm_groups: int = 32
    norm_eps: float = 1e-5
    added_condition: AddedCondition | None = None
    added_input_dim: int | None = None  # input width of the added-condition MLP (diffusers'
    #                                     projection_class_embeddings_input_dim)
    added_time_ids: int = 6  # numbers turned into Fourier features (the rest of the added vector is pooled text)
    added_time_dim: int = 256  # Fourier features per number (diffusers' addition_time_embed_dim)

    def __post_init__(self):
        _check_ints(self, in_channels="image_channels", out_channels="image_channels",
                    layers_per_block="layers_per_block", context_dim="context_dim", norm_groups="norm_groups")
        _set_tuple(self, "channels", _check_levels(self, "channels", self.channels))
        _set_tuple(self, "attention_levels", _check_flags(self, "attention_levels", self.attention_levels))
        if len(self.channels) != len(self.attention_levels):
            raise ParameterError(
                f"UNetConfig: channels has {len(self.channels)} levels but attention_levels has "
                f"{len(self.attention_levels)}; give one flag per level"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ParameterError("UNetConfig: give exactly one of num_heads and head_dim")
        if self.head_dim is None:
            self._check_per_level("num_heads")
        else:
            _check_ints(self, head_dim="head_dim")
        self._check_per_level("transformer_depth")
        _check_bools(self, "use_linear_projection", "upcast_attention")
        _check_number(self, "norm_eps", 0.0, 1.0)
        _check_groups(self, self.channels, self.norm_groups)
        self._check_heads()
        self._check_added()

    def _check_per_level(self, name: str) -> None:
        """`name` is one integer within SIZE_LIMITS[name], or a tuple (a list is stored as one) of such
        integers, one per level."""
        value = getattr(self, name)
        if _is_int(value):
            _check_ints(self, **{name: name})
            return
        low, high = SIZE_LIMITS[name]
        if not isinstance(value, (tuple, list)) or not all(_is_int(v) and low <= v <= high for v in value):
            raise ParameterError(f"UNetConfig.{name} must be an integer from {low} to {high} or a tuple of "
                                 f"such integers, one per level{_got(value)}")
        if len(value) != len(self.channels):
            raise ParameterError(f"UNetConfig.{name} has {len(value)} values but channels has "
                                 f"{len(self.channels)} levels; give one per level")
        _set_tuple(self, name, tuple(value))

    def _check_added(self) -> None:
        _check_ints(self, added_time_ids="added_time_ids", added_time_dim="added_time_dim")
        if self.added_condition is None:
            if self.added_input_dim is not None:
                raise ParameterError("UNetConfig.added_input_dim is set but added_condition is not; "
                                     "set added_condition=\"text_time\" or leave added_input_dim null")
            return
        if self.added_condition != "text_time":
            raise ParameterError("UNetConfig.added_condition must be null or \"text_time\""
                                 f"{_got(self.added_condition) if not isinstance(self.added_condition, str) else ''}")
        _check_ints(self, added_input_dim="added_input_dim")
        if self.added_pooled_dim < 1:
            raise ParameterError("UNetConfig.added_input_dim must exceed added_time_ids * added_time_dim "
                                 "(the rest is the pooled text embedding's width)")

    def _check_heads(self) -> None:
        last = len(self.channels) - 1
        for level, ch in enumerate(self.channels):
            if not (self.attention_levels[level] or level == last):  # the middle block always attends
                continue
            heads = self.heads_at(level)
            if heads < 1 or ch % heads or (self.head_dim is not None and ch % self.head_dim):
                raise ParameterError(
                    f"UNetConfig.channels[{level}] does not split into attention heads of num_heads/head_dim; "
                    f"use a multiple of the head count or size"
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def added_pooled_dim(self) -> int:
        """Width of the pooled text embedding at the start of the added vector (SDXL 1280); 0 without one."""
        if self.added_condition is None:
            return 0
        return self.added_input_dim - self.added_time_ids * self.added_time_dim

    @property
    def added_dim(self) -> int:
        """Width of the added vector the network reads: pooled text embedding + the plain time ids; 0 without."""
        return self.added_pooled_dim + self.added_time_ids if self.added_condition is not None else 0

    def heads_at(self, level: int) -> int:
        """Number of attention heads in the transformers of encoder level `level` (and its mirror)."""
        if isinstance(self.num_heads, tuple):
            return self.num_heads[level]
        if self.num_heads is not None:
            return self.num_heads
        return self.channels[level] // self.head_dim

    def depth_at(self, level: int) -> int:
        """Number of transformer blocks in each spatial transformer of encoder level `level` (and its mirror)."""
        depth = self.transformer_depth
        return depth[level] if isinstance(depth, tuple) else depth


# Fields UNetConfig gained for SDXL: left out of saved configs while they hold their defaults, so that the JSON
# of every SD 1.x/2.x config stays as it was before they existed (and older readers still read it).
_ADDED_FIELDS = ("added_condition", "added_input_dim", "added_time_ids", "added_time_dim")


def unet_config_to_dict(values: dict[str, Any]) -> dict[str, Any]:
    """`dataclasses.asdict(unet_config)` without the added-condition fields that hold their defaults
    (reading the dict back gives them their defaults again)."""
    return _without_defaults(UNetConfig, values, _ADDED_FIELDS)


def text_encoder_config_to_dict(values: dict[str, Any]) -> dict[str, Any]:
    """`dataclasses.asdict(text_encoder_config)` without the SDXL pooling fields that hold their defaults."""
    return _without_defaults(TextEncoderConfig, values, ("projection_dim", "eos_token_id"))


def vae_config_to_dict(values: dict[str, Any]) -> dict[str, Any]:
    """`dataclasses.asdict(vae_config)` without `force_upcast` while it is false."""
    return _without_defaults(VAEConfig, values, ("force_upcast",))


def _without_defaults(cls, values: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    """Saved configs of SD 1.x/2.x stay as they were before the SDXL fields existed: those fields are left
    out while they hold their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if not (k in optional and v == defaults[k])}


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
    # The VAE overflows in fp16 (SDXL's), so diffusers decodes it in fp32 when the model is fp16. sdlab
    # records the flag (configs and files keep it); decoding does not act on it yet.
    force_upcast: bool = False

    def __post_init__(self):
        _check_ints(self, in_channels="image_channels", out_channels="image_channels",
                    latent_channels="image_channels", layers_per_block="layers_per_block", norm_groups="norm_groups")
        _set_tuple(self, "channels", _check_levels(self, "channels", self.channels))
        _check_groups(self, self.channels, self.norm_groups)
        _check_number(self, "scaling_factor", 0.0, MAX_SCALE)
        _check_number(self, "shift_factor", -MAX_SCALE, MAX_SCALE, low_inclusive=True)
        _check_bools(self, "force_upcast")

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

    def __post_init__(self):
        _check_ints(self, num_train_timesteps="num_train_timesteps")
        _check_number(self, "beta_start", 0.0, 1.0)
        _check_number(self, "beta_end", 0.0, 1.0)
        if self.beta_start > self.beta_end:
            raise ParameterError("ScheduleConfig.beta_start must not exceed beta_end")
        if not _is_int(self.steps_offset) or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ParameterError("ScheduleConfig.steps_offset must be an integer from 0 to num_train_timesteps - 1")
        _check_bools(self, "zero_terminal_snr")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Stable Diffusion model and sample from it."""

    name: str
    family: str = "sd1"  # the `sdlab.families` module that owns this kind of model: key maps, components...
    # The first text encoder; None where the family has no network by that name (the SDXL refiner encodes
    # prompts with its one OpenCLIP ViT-bigG, a `text_encoder_2` as in the base model).
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "epsilon"
    default_size: int = 512  # the image side the model was trained at
    default_guidance: float = 7.0  # the CFG scale generation uses when none is given
    # The configs of networks beyond the three above, by component name (SDXL: "text_encoder_2"), as
    # (name, frozen config) pairs so that the config stays hashable; a mapping given here is stored so.
    extra_networks: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ParameterError(f"ModelConfig.name must be a string{_got(self.name)}")
        if not isinstance(self.family, str):
            raise ParameterError(f"ModelConfig.family must be a string{_got(self.family)}")
        for name, cls in (("text_encoder", TextEncoderConfig), ("unet", UNetConfig), ("vae", VAEConfig),
                          ("schedule", ScheduleConfig)):
            if not isinstance(getattr(self, name), cls) and not (name == "text_encoder" and self.text_encoder is None):
                raise ParameterError(f"ModelConfig.{name} must be a {cls.__name__}{_got(getattr(self, name))}")
        _check_ints(self, default_size="default_size")
        _check_number(self, "default_guidance", 0.0, 100.0, low_inclusive=True)
        _set_tuple(self, "extra_networks", _check_extra_networks(self.extra_networks))

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def networks(self) -> dict[str, Any]:
        """Every network's config by component name: text_encoder, unet, vae, then the extra ones."""
        fields = {name: cfg for name in NETWORK_FIELDS if (cfg := getattr(self, name)) is not None}
        return {**fields, **dict(self.extra_networks)}

    def network(self, name: str) -> Any:
        """The config of the network `name` (a component name of the model's family)."""
        networks = self.networks
        if name not in networks:
            raise ParameterError(f"ModelConfig has no network {name!r}; it has {list(networks)}")
        return networks[name]

    @staticmethod
    def network_fields(networks: Mapping[str, Any]) -> dict[str, Any]:
        """ModelConfig(...) keyword arguments for network configs by component name: the three with
        fields of their own, the others as `extra_networks`."""
        fields: dict[str, Any] = {name: networks.get(name) for name in NETWORK_FIELDS}
        extra = tuple((name, cfg) for name, cfg in networks.items() if name not in NETWORK_FIELDS)
        return {**fields, **({"extra_networks": extra} if extra else {})}

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


NETWORK_FIELDS = ("text_encoder", "unet", "vae")  # the networks with fields of their own (text_encoder may be None)


def _check_extra_networks(value) -> tuple[tuple[str, Any], ...]:
    pairs = tuple(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ParameterError("ModelConfig.extra_networks must be (component name, config) pairs or a mapping")
    names = [name for name, _ in pairs]
    if not all(isinstance(n, str) and n not in NETWORK_FIELDS for n in names) or len(set(names)) != len(names):
        raise ParameterError("ModelConfig.extra_networks names must be distinct component names other than "
                             f"{', '.join(NETWORK_FIELDS)} (those are fields)")
    for name, cfg in pairs:
        frozen = dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) and cfg.__dataclass_params__.frozen
        if not frozen:
            raise ParameterError(f"ModelConfig.extra_networks[{name!r}] must be a frozen config dataclass"
                                 f"{_got(cfg)}")
    return tuple((name, cfg) for name, cfg in pairs)


# --- validation helpers -----------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _got(value) -> str:
    """What kind of value was given, for messages that must not repeat the value itself."""
    return "" if _is_int(value) else f" (got {describe_type(value)})"


def describe_type(value) -> str:
    """The JSON-ish kind of a value ("a string", "a list", "null"...), for error messages."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _check_ints(config, **limits: str) -> None:
    """Each named field must be an integer within SIZE_LIMITS[its kind]."""
    for name, kind in limits.items():
        low, high = SIZE_LIMITS[kind]
        value = getattr(config, name)
        if not _is_int(value) or not low <= value <= high:
            raise ParameterError(f"{type(config).__name__}.{name} must be an integer from {low} to {high}{_got(value)}")


def _check_levels(config, name: str, values) -> tuple[int, ...]:
    low, high = SIZE_LIMITS["channels"]
    most = SIZE_LIMITS["levels"][1]
    ok = isinstance(values, (tuple, list)) and 1 <= len(values) <= most
    if not ok or not all(_is_int(v) and low <= v <= high for v in values):
        raise ParameterError(
            f"{type(config).__name__}.{name} must be 1 to {most} integers (one per level) from {low} to {high}"
        )
    return tuple(values)


def _check_flags(config, name: str, values) -> tuple[bool, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, bool) for v in values):
        raise ParameterError(f"{type(config).__name__}.{name} must be a tuple of booleans, one per level")
    return tuple(values)


def _check_bools(config, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ParameterError(f"{type(config).__name__}.{name} must be a boolean{_got(getattr(config, name))}")


def _check_number(config, name: str, low: float, high: float, *, low_inclusive: bool = False) -> None:
    """A finite real number in (low, high] (or [low, high])."""
    value = getattr(config, name)
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not (low <= value if low_inclusive else low < value) or value > high:
        bracket = "[" if low_inclusive else "("
        raise ParameterError(
            f"{type(config).__name__}.{name} must be a number in {bracket}{low:g}, {high:g}]"
            + ("" if isinstance(value, (int, float)) else f" (got {describe_type(value)})")
        )


def _check_groups(config, channels: tuple[int, ...], groups: int) -> None:
    for level, ch in enumerate(channels):
        if ch % groups:
            raise ParameterError(f"{type(config).__name__}.channels[{level}] is not a multiple of norm_groups")


def _set_tuple(config, name: str, value: tuple) -> None:
    object.__setattr__(config, name, value)  # a list given for a tuple field is stored as a tuple (frozen)


# The presets live with their families (sdlab.families.sd1, sd2, ...); `sdlab.config.SD15` etc. still work.
_PRESET_NAMES = ("PRESETS", "SD15", "SD15_INPAINT", "SD21_BASE", "SD21", "SD2_INPAINT", "TINY")


def __getattr__(name: str):
    if name in _PRESET_NAMES:  # imported on first use: the families import this module's dataclasses
        from . import families

        return getattr(families, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
