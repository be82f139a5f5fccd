"""Translation between diffusers/transformers `config.json` dicts and sdlab's config dataclasses, both ways.

Where the names differ:

| sdlab                       | diffusers / transformers                                                 |
| --------------------------- | ------------------------------------------------------------------------ |
| UNetConfig.channels         | block_out_channels                                                       |
| UNetConfig.attention_levels | down_block_types: CrossAttnDownBlock2D (True) / DownBlock2D (False)      |
| UNetConfig.num_heads        | attention_head_dim (sic: diffusers uses it as the number of heads)       |
| UNetConfig.head_dim         | attention_head_dim as a per-level list of heads, channels[i] // head_dim |
| UNetConfig.transformer_depth| transformer_layers_per_block                                             |
| UNetConfig.context_dim      | cross_attention_dim                                                      |
| *.norm_groups               | norm_num_groups                                                          |
| VAEConfig.channels          | block_out_channels                                                       |
| TextEncoderConfig.width     | hidden_size (mlp_width: intermediate_size, num_layers: num_hidden_layers)|
| TextEncoderConfig.activation| hidden_act                                                               |
| ModelConfig.prediction      | scheduler_config.json prediction_type                                    |

Settings of the diffusers classes that sdlab's networks do not implement (class embeddings, other block
types...) raise `CheckpointError` naming the field, rather than loading a model that would compute
something else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..config import PRESETS, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers release whose config format these files follow

# diffusers UNet2DConditionModel settings that must keep their default for sdlab's UNet to compute the same.
UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
}
VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


# --- UNet -----------------------------------------------------------------------------------------------


def unet_from_diffusers(d: Mapping[str, Any], where: str = "unet/config.json") -> UNetConfig:
    _check_fixed(d, UNET_FIXED, where)
    channels = tuple(_required(d, "block_out_channels", where))
    attention = tuple(_attention_levels(d, where))
    if len(attention) != len(channels):
        raise CheckpointError(
            f"{where}: down_block_types has {len(attention)} entries but block_out_channels has {len(channels)}"
        )
    num_heads, head_dim = _heads(d, channels, where)
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=channels,
        attention_levels=attention,
        layers_per_block=_single_int(d.get("layers_per_block", 2), "layers_per_block", where),
        context_dim=_single_int(d.get("cross_attention_dim", 1280), "cross_attention_dim", where),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=_single_int(d.get("transformer_layers_per_block", 1), "transformer_layers_per_block", where),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        norm_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
    )


def unet_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """A UNet2DConditionModel config.json dict; `sample_size` is the latent side (image side / 8)."""
    levels = len(cfg.channels)
    heads = cfg.num_heads if cfg.num_heads is not None else [cfg.heads_at(i) for i in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)],
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.layers_per_block,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads,  # the number of heads, per diffusers' historical naming
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        **UNET_FIXED,
    }


def _attention_levels(d: Mapping[str, Any], where: str) -> list[bool]:
    down = _required(d, "down_block_types", where)
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    unknown = [t for t in down if t not in known]
    if unknown:
        raise CheckpointError(f"{where}: down_block_types {unknown} are not supported; use {list(known)}")
    levels = [known[t] for t in down]
    up = d.get("up_block_types")
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    if up is not None and list(up) != expected_up:
        raise CheckpointError(
            f"{where}: up_block_types {list(up)} do not mirror down_block_types; expected {expected_up}"
        )
    return levels


def _heads(d: Mapping[str, Any], channels: tuple[int, ...], where: str) -> tuple[int | None, int | None]:
    """(num_heads, head_dim) from diffusers' `num_attention_heads`, or else `attention_head_dim`, which
    diffusers' UNet2DConditionModel reads as a number of heads (an int, or one per level)."""
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    if isinstance(heads, int):
        return heads, None
    heads = list(heads)
    if len(heads) != len(channels):
        raise CheckpointError(f"{where}: attention_head_dim has {len(heads)} entries for {len(channels)} levels")
    if len(set(heads)) == 1:
        return heads[0], None
    head_dims = {c // h for c, h in zip(channels, heads, strict=True)}
    if len(head_dims) != 1 or any(c % h for c, h in zip(channels, heads, strict=True)):
        raise CheckpointError(
            f"{where}: attention_head_dim {heads} (heads per level) gives neither the same number of heads nor "
            f"the same head size at every level of block_out_channels {list(channels)}; sdlab supports those two"
        )
    return None, head_dims.pop()


# --- VAE ------------------------------------------------------------------------------------------------


def vae_from_diffusers(d: Mapping[str, Any], where: str = "vae/config.json") -> VAEConfig:
    _check_fixed(d, VAE_FIXED, where)
    channels = tuple(_required(d, "block_out_channels", where))
    for field in ("down_block_types", "up_block_types"):
        kinds = set(d.get(field) or [])
        allowed = {"DownEncoderBlock2D"} if field.startswith("down") else {"UpDecoderBlock2D"}
        if kinds - allowed:
            raise CheckpointError(f"{where}: {field} {sorted(kinds)} are not supported; use {sorted(allowed)}")
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        channels=channels,
        layers_per_block=d.get("layers_per_block", 2),
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
    )


def vae_to_diffusers(cfg: VAEConfig, sample_size: int) -> dict[str, Any]:
    levels = len(cfg.channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,
        **VAE_FIXED,
    }


# --- text encoder ---------------------------------------------------------------------------------------


def text_encoder_from_transformers(
    d: Mapping[str, Any], pad_token_id: int | None = None, where: str = "text_encoder/config.json"
) -> TextEncoderConfig:
    """A CLIPTextConfig dict -> TextEncoderConfig. The padding token is the tokenizer's (CLIPTextConfig's
    own `pad_token_id` is an unused leftover); without one it is guessed from the family: OpenCLIP (GELU)
    pads with "!" (0), OpenAI CLIP with <|endoftext|> (49407)."""
    architecture = (d.get("architectures") or ["CLIPTextModel"])[0]
    if d.get("model_type", "clip_text_model") != "clip_text_model" or architecture not in CLIP_ARCHITECTURES:
        raise CheckpointError(
            f"{where}: a {architecture} ({d.get('model_type')}) text encoder is not supported; "
            f"sdlab supports CLIPTextModel (model_type clip_text_model)"
        )
    activation = d.get("hidden_act", "quick_gelu")
    if activation not in CLIP_ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {activation!r} is not supported; use one of {CLIP_ACTIVATIONS}")
    if pad_token_id is None:
        pad_token_id = 0 if activation == "gelu" else 49407
    return TextEncoderConfig(
        vocab_size=d.get("vocab_size", 49408),
        max_length=d.get("max_position_embeddings", 77),
        width=_required(d, "hidden_size", where),
        num_layers=_required(d, "num_hidden_layers", where),
        num_heads=_required(d, "num_attention_heads", where),
        mlp_width=_required(d, "intermediate_size", where),
        activation=activation,
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        pad_token_id=pad_token_id,
    )


def text_encoder_to_transformers(cfg: TextEncoderConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }


# --- scheduler ------------------------------------------------------------------------------------------


def schedule_from_diffusers(
    d: Mapping[str, Any], where: str = "scheduler/scheduler_config.json"
) -> tuple[ScheduleConfig, str]:
    """(the training noise schedule, what the UNet predicts) from any diffusers scheduler config."""
    if d.get("trained_betas") is not None:
        raise CheckpointError(
            f"{where}: explicit trained_betas are not supported; give beta_start/beta_end/beta_schedule"
        )
    schedule = d.get("beta_schedule", "linear")
    if schedule not in ("scaled_linear", "linear"):
        raise CheckpointError(f"{where}: beta_schedule {schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    prediction = d.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(
            f"{where}: prediction_type {prediction!r} is not supported; use 'epsilon' or 'v_prediction'"
        )
    spacing = d.get("timestep_spacing", _default_spacing(d.get("_class_name", "")))
    if spacing not in ("leading", "linspace", "trailing"):
        raise CheckpointError(f"{where}: timestep_spacing {spacing!r} is not supported; use leading, linspace or trailing")
    config = ScheduleConfig(
        num_train_timesteps=d.get("num_train_timesteps", 1000),
        beta_start=d.get("beta_start", 0.0001),
        beta_end=d.get("beta_end", 0.02),
        beta_schedule=schedule,
        timestep_spacing=spacing,
        steps_offset=int(d.get("steps_offset", 0)),  # diffusers' default when the file does not say
        zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)),
    )
    return config, prediction


def _default_spacing(scheduler_class: str) -> str:
    """What a diffusers scheduler class uses when its config names no timestep_spacing."""
    leading = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "")
    return "leading" if scheduler_class in leading else "linspace"


def schedule_to_diffusers(cfg: ScheduleConfig, prediction: str) -> dict[str, Any]:
    """The scheduler SD ships with: PNDM for epsilon models, DDIM for v-prediction ones (as SD 2.1 does)."""
    return {
        "_class_name": "PNDMScheduler" if prediction == "epsilon" else "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": prediction,
        "trained_betas": None,
        "set_alpha_to_one": False,
        "timestep_spacing": cfg.timestep_spacing,
        "steps_offset": cfg.steps_offset,
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "skip_prk_steps": True,
        "clip_sample": False,
    }


# --- whole model ----------------------------------------------------------------------------------------


def config_to_json(config: ModelConfig) -> str:
    """sdlab's own serialisation of a ModelConfig (stored in the metadata of the single files it writes)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str, where: str) -> ModelConfig:
    try:
        d = json.loads(text)
        return ModelConfig(
            name=d["name"],
            text_encoder=TextEncoderConfig(**d["text_encoder"]),
            unet=_with_tuples(UNetConfig, d["unet"]),
            vae=_with_tuples(VAEConfig, d["vae"]),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction=d["prediction"],
            default_size=d["default_size"],
            # files written before the field existed have none
            default_guidance=d.get("default_guidance", ModelConfig.default_guidance),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: the stored sdlab model config is malformed ({e})") from e


def named_like_preset(config: ModelConfig, fallback: str) -> ModelConfig:
    """`config` named after the preset it equals (apart from the name), else named `fallback`."""
    for preset in PRESETS.values():
        if preset.replace(name=fallback) == config.replace(name=fallback):
            return config.replace(name=preset.name)
    return config.replace(name=fallback)


def _with_tuples(cls, d: Mapping[str, Any]):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check_fixed(d: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for name, value in fixed.items():
        if name in d and d[name] != value:
            raise CheckpointError(f"{where}: {name}={d[name]!r} is not supported by sdlab's networks; only {value!r}")


def _required(d: Mapping[str, Any], name: str, where: str):
    if name not in d:
        raise CheckpointError(f"{where}: the field {name!r} is missing")
    return d[name]


def _single_int(value, name: str, where: str) -> int:
    """Some fields may be per-level lists in diffusers; sdlab needs one value for all levels."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: {name}={list(value)} differs between levels; sdlab needs one value")
        value = value[0]
    return int(value)
