"""Translation between diffusers/transformers `config.json` dicts and sdlab's config dataclasses, both ways.

Where the names differ:

| sdlab                       | diffusers / transformers                                                 |
| --------------------------- | ------------------------------------------------------------------------ |
| UNetConfig.channels         | block_out_channels                                                       |
| UNetConfig.attention_levels | down_block_types: CrossAttnDownBlock2D (True) / DownBlock2D (False)      |
| UNetConfig.num_heads        | attention_head_dim (sic: diffusers uses it as the number of heads)       |
| UNetConfig.head_dim         | attention_head_dim as a per-level list of heads, channels[i] // head_dim |
| UNetConfig.transformer_depth| transformer_layers_per_block (one, or one per level: SDXL [1, 2, 10])    |
| UNetConfig.context_dim      | cross_attention_dim                                                      |
| UNetConfig.added_condition  | addition_embed_type ("text_time": SDXL's pooled text + size numbers)     |
| UNetConfig.added_input_dim  | projection_class_embeddings_input_dim (added_time_dim: addition_time_...)|
| UNetConfig.added_time_ids   | (not in the UNet's config: the family's pipeline, base 6, refiner 5)     |
| VAEConfig.force_upcast      | force_upcast (read for SDXL, whose pipelines act on it)                  |
| TextEncoderConfig.projection_dim | projection_dim of a CLIPTextModelWithProjection (else none)         |
| *.norm_groups               | norm_num_groups                                                          |
| VAEConfig.channels          | block_out_channels                                                       |
| TextEncoderConfig.width     | hidden_size (mlp_width: intermediate_size, num_layers: num_hidden_layers)|
| TextEncoderConfig.activation| hidden_act                                                               |
| ModelConfig.prediction      | scheduler_config.json prediction_type                                    |

Settings of the diffusers classes that sdlab's networks do not implement (class embeddings, other block
types...) raise `CheckpointError` naming the field, rather than loading a model that would compute
something else. Every field read is checked for its JSON type and range (`sdlab.config.SIZE_LIMITS`) before
anything is built; messages name the file and the field but never repeat the file's value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .. import families
from ..config import (
    SIZE_LIMITS,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    describe_type,
    text_encoder_config_to_dict,
    unet_config_to_dict,
    vae_config_to_dict,
)
from ..errors import CheckpointError, ParameterError

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
    "class_embeddings_concat": False,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "reverse_transformer_layers_per_block": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
}
VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
ADDED_CONDITIONS = ("text_time",)  # diffusers' addition_embed_type values sdlab's UNet implements (SDXL's)
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
EOS_TOKEN_ID = 49407  # CLIP's <|endoftext|>, the largest id of its vocabulary
LEGACY_EOS_TOKEN_ID = 2  # what older CLIPTextConfig files say (transformers then takes the largest id)
MAX_SAMPLE_SIZE = 2048  # the UNet's latent side: SD 64/96, SDXL 128
_REQUIRED = object()


# --- UNet -----------------------------------------------------------------------------------------------


def unet_from_diffusers(
    d: Mapping[str, Any], where: str = "unet/config.json", *, added_time_ids: int = 6
) -> UNetConfig:
    """A UNet2DConditionModel config dict -> UNetConfig. `added_time_ids` is how many plain numbers follow the
    pooled text in a `text_time` added vector (SDXL base 6, refiner 5): the UNet's config does not say, its
    pipeline does, so the family passes it."""
    _check_fixed(d, UNET_FIXED, where)
    channels = _channels(d, where)
    attention = tuple(_attention_levels(d, where))
    if len(attention) != len(channels):
        raise CheckpointError(
            f"{where}: down_block_types has {len(attention)} entries but block_out_channels has {len(channels)}"
        )
    num_heads, head_dim = _heads(d, channels, where)
    return _build(UNetConfig, where,
        in_channels=_int(d, "in_channels", where, 4, "image_channels"),
        out_channels=_int(d, "out_channels", where, 4, "image_channels"),
        channels=channels,
        attention_levels=attention,
        layers_per_block=_single_int(d, "layers_per_block", where, 2, "layers_per_block"),
        context_dim=_single_int(d, "cross_attention_dim", where, 1280, "context_dim"),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=_per_level_int(d, "transformer_layers_per_block", where, len(channels), "transformer_depth"),
        use_linear_projection=_bool(d, "use_linear_projection", where, False),
        upcast_attention=_bool(d, "upcast_attention", where, False, null=False),  # SDXL's files say null
        norm_groups=_int(d, "norm_num_groups", where, 32, "norm_groups"),
        norm_eps=_number(d, "norm_eps", where, 1e-5, 0.0, 1.0),
        **_added_condition(d, where, added_time_ids),
    )  # fmt: skip


def _added_condition(d: Mapping[str, Any], where: str, added_time_ids: int) -> dict[str, Any]:
    """The UNetConfig fields of diffusers' added embedding (`addition_embed_type`; none for SD 1.x/2.x)."""
    kind = d.get("addition_embed_type")
    if kind is None:
        return {}
    if kind not in ADDED_CONDITIONS:
        raise CheckpointError(f"{where}: addition_embed_type is not supported; use null or one of {ADDED_CONDITIONS}")
    return {
        "added_condition": kind,
        "added_input_dim": _int(d, "projection_class_embeddings_input_dim", where, _REQUIRED, "added_input_dim"),
        "added_time_dim": _int(d, "addition_time_embed_dim", where, _REQUIRED, "added_time_dim"),
        "added_time_ids": added_time_ids,
    }


def controlnet_from_diffusers(d: Mapping[str, Any], where: str = "controlnet/config.json", *,
                              added_time_ids: int = 6):
    """A ControlNetModel config dict -> ControlNetConfig: the UNet fields as `unet_from_diffusers` reads them
    (a ControlNet has no decoder: out_channels is the latents'), plus the hint encoder's."""
    from ..nn.controlnet import CHANNEL_ORDERS, ControlNetConfig  # (the config module stays network-free)

    unet = unet_from_diffusers({**d, "out_channels": d.get("in_channels", 4)}, where, added_time_ids=added_time_ids)
    widths = _value(d, "conditioning_embedding_out_channels", where, [16, 32, 96, 256])
    low, high = SIZE_LIMITS["channels"]
    if not (isinstance(widths, list) and 1 <= len(widths) <= 8 and all(_is_int(c) and low <= c <= high for c in widths)):
        raise CheckpointError(f"{where}: conditioning_embedding_out_channels must be a list of 1 to 8 integers "
                              f"from {low} to {high}")
    order = _value(d, "controlnet_conditioning_channel_order", where, "rgb")
    if order not in CHANNEL_ORDERS:
        raise CheckpointError(f"{where}: controlnet_conditioning_channel_order must be one of {CHANNEL_ORDERS}")
    return _build(ControlNetConfig, where, unet=unet,
                  conditioning_channels=_int(d, "conditioning_channels", where, 3, "image_channels"),
                  embedding_channels=tuple(widths), global_pool=_bool(d, "global_pool_conditions", where, False),
                  channel_order=order)


def controlnet_to_diffusers(cfg) -> dict[str, Any]:
    """A ControlNetModel config.json dict for a ControlNetConfig."""
    unet = unet_to_diffusers(cfg.unet, 64)
    for decoder_only in ("out_channels", "up_block_types", "sample_size", "center_input_sample"):
        unet.pop(decoder_only, None)
    return {**unet, "_class_name": "ControlNetModel", "conditioning_channels": cfg.conditioning_channels,
            "conditioning_embedding_out_channels": list(cfg.embedding_channels),
            "global_pool_conditions": cfg.global_pool, "controlnet_conditioning_channel_order": cfg.channel_order}


def unet_sample_size(d: Mapping[str, Any], where: str = "unet/config.json") -> int:
    """The latent side the UNet was trained at (`sample_size`, 64 when absent)."""
    value = d.get("sample_size", 64)
    if not _is_int(value) or not 1 <= value <= MAX_SAMPLE_SIZE:
        raise CheckpointError(f"{where}: sample_size must be an integer from 1 to {MAX_SAMPLE_SIZE}{_got(value)}")
    return value


def unet_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """A UNet2DConditionModel config.json dict; `sample_size` is the latent side (image side / 8)."""
    levels = len(cfg.channels)
    heads = [cfg.heads_at(i) for i in range(levels)] if cfg.num_heads is None else _json_value(cfg.num_heads)
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
        "transformer_layers_per_block": _json_value(cfg.transformer_depth),
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        **UNET_FIXED,
        "addition_embed_type": cfg.added_condition,
        **({} if cfg.added_condition is None else {
            "projection_class_embeddings_input_dim": cfg.added_input_dim,
            "addition_time_embed_dim": cfg.added_time_dim,
        }),
    }


def _json_value(value):
    """A config value as JSON holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _attention_levels(d: Mapping[str, Any], where: str) -> list[bool]:
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    down = _str_list(d, "down_block_types", where, _REQUIRED)
    if any(t not in known for t in down):
        raise CheckpointError(f"{where}: down_block_types names a block type sdlab does not support; use {list(known)}")
    levels = [known[t] for t in down]
    up = _str_list(d, "up_block_types", where, None)
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    if up is not None and up != expected_up:
        raise CheckpointError(f"{where}: up_block_types do not mirror down_block_types; expected {expected_up}")
    return levels


def _heads(d: Mapping[str, Any], channels: tuple[int, ...], where: str) -> tuple[int | None, int | None]:
    """(num_heads, head_dim) from diffusers' `num_attention_heads`, or else `attention_head_dim`, which
    diffusers' UNet2DConditionModel reads as a number of heads (an int, or one per level)."""
    name = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
    heads = d.get(name, 8)
    low, high = SIZE_LIMITS["num_heads"]
    if _is_int(heads) and low <= heads <= high:
        return heads, None
    if not (isinstance(heads, list) and all(_is_int(h) and low <= h <= high for h in heads)):
        raise CheckpointError(
            f"{where}: {name} must be a number of heads from {low} to {high}, or a list of them (one per level)"
        )
    if len(heads) != len(channels):
        raise CheckpointError(f"{where}: {name} has {len(heads)} entries for {len(channels)} levels")
    if len(set(heads)) == 1:
        return heads[0], None
    head_dims = {c // h for c, h in zip(channels, heads, strict=True)}
    if len(head_dims) == 1 and not any(c % h for c, h in zip(channels, heads, strict=True)):
        return None, head_dims.pop()  # one head size (SDXL: 64), the form sdlab's presets use
    if any(c % h for c, h in zip(channels, heads, strict=True)):
        raise CheckpointError(f"{where}: {name} gives a level a number of heads its block_out_channels width "
                              f"does not divide into")
    return tuple(heads), None


# --- VAE ------------------------------------------------------------------------------------------------


def vae_from_diffusers(
    d: Mapping[str, Any], where: str = "vae/config.json", *, reads_force_upcast: bool = False
) -> VAEConfig:
    """An AutoencoderKL config dict -> VAEConfig. `force_upcast` (decode in fp32 when the model is fp16) is
    read only where the family's diffusers pipelines act on it (`reads_force_upcast`: SDXL's, where it
    defaults to true as in diffusers); SD 1.x/2.x pipelines ignore it, and so does sdlab for them."""
    _check_fixed(d, VAE_FIXED, where)
    channels = _channels(d, where)
    for name in ("down_block_types", "up_block_types"):
        kinds = set(_str_list(d, name, where, None) or [])
        allowed = {"DownEncoderBlock2D"} if name.startswith("down") else {"UpDecoderBlock2D"}
        if kinds - allowed:
            raise CheckpointError(f"{where}: {name} names a block type sdlab does not support; use {sorted(allowed)}")
        if kinds and len(d[name]) != len(channels):
            raise CheckpointError(f"{where}: {name} has {len(d[name])} entries for {len(channels)} levels")
    shift = d.get("shift_factor")
    return _build(VAEConfig, where,
        in_channels=_int(d, "in_channels", where, 3, "image_channels"),
        out_channels=_int(d, "out_channels", where, 3, "image_channels"),
        latent_channels=_int(d, "latent_channels", where, 4, "image_channels"),
        channels=channels,
        layers_per_block=_int(d, "layers_per_block", where, 2, "layers_per_block"),
        norm_groups=_int(d, "norm_num_groups", where, 32, "norm_groups"),
        scaling_factor=_number(d, "scaling_factor", where, 0.18215, 0.0, 1000.0),
        shift_factor=0.0 if shift is None else _number(d, "shift_factor", where, 0.0, -1000.0, 1000.0),
        force_upcast=_bool(d, "force_upcast", where, True) if reads_force_upcast else False,
    )  # fmt: skip


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
        "force_upcast": cfg.force_upcast,
        **VAE_FIXED,
    }


# --- text encoder ---------------------------------------------------------------------------------------


def text_encoder_from_transformers(
    d: Mapping[str, Any], pad_token_id: int | None = None, where: str = "text_encoder/config.json"
) -> TextEncoderConfig:
    """A CLIPTextConfig dict -> TextEncoderConfig. The padding token is the tokenizer's (CLIPTextConfig's
    own `pad_token_id` is an unused leftover); the caller passes the family's default when the tokenizer
    names none (None: OpenAI CLIP's <|endoftext|>, 49407)."""
    architectures = _str_list(d, "architectures", where, None) or ["CLIPTextModel"]
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model" or architectures[0] not in CLIP_ARCHITECTURES:
        raise CheckpointError(
            f"{where}: architectures/model_type name a text encoder that is not supported; "
            f"sdlab supports CLIPTextModel (model_type clip_text_model)"
        )
    activation = d.get("hidden_act", "quick_gelu")
    if activation not in CLIP_ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act is not supported; use one of {CLIP_ACTIVATIONS}")
    if pad_token_id is None:
        pad_token_id = TextEncoderConfig.pad_token_id
    # CLIPTextModel configs carry a projection_dim too; only CLIPTextModelWithProjection has the projection.
    projected = architectures[0] == "CLIPTextModelWithProjection"
    eos = d.get("eos_token_id", LEGACY_EOS_TOKEN_ID)
    return _build(TextEncoderConfig, where,
        vocab_size=_int(d, "vocab_size", where, 49408, "vocab_size"),
        max_length=_int(d, "max_position_embeddings", where, 77, "max_length"),
        width=_int(d, "hidden_size", where, _REQUIRED, "width"),
        num_layers=_int(d, "num_hidden_layers", where, _REQUIRED, "num_layers"),
        num_heads=_int(d, "num_attention_heads", where, _REQUIRED, "num_heads"),
        mlp_width=_int(d, "intermediate_size", where, _REQUIRED, "mlp_width"),
        activation=activation,
        layer_norm_eps=_number(d, "layer_norm_eps", where, 1e-5, 0.0, 1.0),
        pad_token_id=pad_token_id,
        projection_dim=_int(d, "projection_dim", where, _REQUIRED, "width") if projected else None,
        # transformers' two rules for finding the end-of-text token (TextEncoderConfig.eos_token_id): the
        # legacy id 2 means "the largest id"; with CLIP's vocabulary, where <|endoftext|> is the largest id,
        # looking for the first 49407 finds the same position.
        eos_token_id=None if eos in (LEGACY_EOS_TOKEN_ID, EOS_TOKEN_ID) else _int(
            d, "eos_token_id", where, _REQUIRED, "vocab_size", low=0),
    )  # fmt: skip


def text_encoder_to_transformers(cfg: TextEncoderConfig) -> dict[str, Any]:
    projected = cfg.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim if projected else cfg.width,
        "bos_token_id": 49406,
        "eos_token_id": EOS_TOKEN_ID if cfg.eos_token_id is None else cfg.eos_token_id,
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
        raise CheckpointError(f"{where}: beta_schedule is not supported; use 'scaled_linear' or 'linear'")
    prediction = d.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{where}: prediction_type is not supported; use 'epsilon' or 'v_prediction'")
    scheduler_class = d.get("_class_name", "")
    spacing = d.get("timestep_spacing", _default_spacing(scheduler_class if isinstance(scheduler_class, str) else ""))
    if spacing not in ("leading", "linspace", "trailing"):
        raise CheckpointError(f"{where}: timestep_spacing is not supported; use leading, linspace or trailing")
    config = _build(ScheduleConfig, where,
        num_train_timesteps=_int(d, "num_train_timesteps", where, 1000, "num_train_timesteps"),
        beta_start=_number(d, "beta_start", where, 0.0001, 0.0, 1.0),
        beta_end=_number(d, "beta_end", where, 0.02, 0.0, 1.0),
        beta_schedule=schedule,
        timestep_spacing=spacing,
        steps_offset=_int(d, "steps_offset", where, 0, "num_train_timesteps", low=0),  # diffusers' default: 0
        zero_terminal_snr=_bool(d, "rescale_betas_zero_snr", where, False),
    )  # fmt: skip
    return config, prediction


def _default_spacing(scheduler_class: str) -> str:
    """What a diffusers scheduler class uses when its config names no timestep_spacing."""
    leading = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler", "")
    return "leading" if scheduler_class in leading else "linspace"


def schedule_to_diffusers(cfg: ScheduleConfig, prediction: str, scheduler_class: str | None = None) -> dict[str, Any]:
    """A scheduler config of `scheduler_class` (the family's; SDXL ships EulerDiscreteScheduler), or else the
    one SD ships with: PNDM for epsilon models, DDIM for v-prediction ones (as SD 2.1 does). The fields are
    those every diffusers scheduler reads the training schedule from; each class ignores the others."""
    default = "PNDMScheduler" if prediction == "epsilon" else "DDIMScheduler"
    return {
        "_class_name": scheduler_class or default,
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
    d = dataclasses.asdict(config)
    d["unet"] = unet_config_to_dict(d["unet"])  # SD 1.x/2.x: as before the SDXL fields existed
    if d["text_encoder"] is not None:  # (None: the SDXL refiner has no first text encoder)
        d["text_encoder"] = text_encoder_config_to_dict(d["text_encoder"])
    d["vae"] = vae_config_to_dict(d["vae"])
    # The extra networks as an object by component name, and only when there are any: files of the
    # families with three networks read as before.
    extra = d.pop("extra_networks")
    if extra:
        d["extra_networks"] = {name: cfg for name, cfg in extra}
    return json.dumps(d, sort_keys=True)


def config_from_json(text: str, where: str, *, default_family: Callable[[], str] | None = None) -> ModelConfig:
    """The ModelConfig `config_to_json` wrote. Files written before configs named their family have none:
    `default_family()` (the caller recognises it from the weights) gives it then."""
    try:
        d = json.loads(text)
        family = d["family"] if "family" in d or default_family is None else default_family()
        config = ModelConfig(
            name=d["name"],
            family=family,
            text_encoder=None if d["text_encoder"] is None else TextEncoderConfig(**d["text_encoder"]),
            unet=_with_tuples(UNetConfig, d["unet"]),
            vae=_with_tuples(VAEConfig, d["vae"]),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction=d["prediction"],
            default_size=d["default_size"],
            # files written before the field existed have none
            default_guidance=d.get("default_guidance", ModelConfig.default_guidance),
            extra_networks=_extra_networks_from_json(d.get("extra_networks", {}), family),
        )
    except ParameterError as e:  # a field out of range: the message names the field, not its value
        raise CheckpointError(f"{where}: the stored sdlab model config is invalid: {e}") from e
    except CheckpointError:  # from default_family(): it names the file and what is wrong
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(
            f"{where}: the stored sdlab model config is malformed (a field is missing, unknown or of the wrong "
            f"type: {type(e).__name__})"
        ) from e
    if config.prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{where}: the stored sdlab model config has an unknown prediction")
    if config.family not in families.FAMILIES:
        raise CheckpointError(f"{where}: the stored sdlab model config names an unknown model family; "
                              f"sdlab has {sorted(families.FAMILIES)}")
    return config


def _extra_networks_from_json(d: Mapping[str, Any], family: str) -> tuple[tuple[str, Any], ...]:
    """The extra networks' configs, each of the config class its family's component declares."""
    components = families.get_family(family).components if d else {}
    if not isinstance(d, dict) or not all(name in components for name in d):
        raise ValueError("extra_networks names a component its family does not have")
    return tuple((name, _with_tuples(components[name].config_class, cfg)) for name, cfg in d.items())


def model_config(where: str, **fields) -> ModelConfig:
    """A ModelConfig from checked parts; a rule that ties fields together becomes a CheckpointError."""
    return _build(ModelConfig, where, **fields)


def named_like_preset(config: ModelConfig, fallback: str) -> ModelConfig:
    """`config` named after the preset it equals (apart from the name), else named `fallback`."""
    for preset in families.PRESETS.values():
        if preset.replace(name=fallback) == config.replace(name=fallback):
            return config.replace(name=preset.name)
    return config.replace(name=fallback)


def _with_tuples(cls, d: Mapping[str, Any]):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _build(cls, where: str, **fields):
    """`cls(**fields)`, with its validation (`sdlab.config`) reported against the file `where`."""
    try:
        return cls(**fields)
    except ParameterError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _check_fixed(d: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for name, value in fixed.items():
        if name in d and (d[name] != value or type(d[name]) is not type(value)) and not _same_number(d[name], value):
            raise CheckpointError(f"{where}: {name} is not supported by sdlab's networks unless it is {value!r}")


def _same_number(a, b) -> bool:
    """1 and 1.0 are the same setting; True and 1 are not."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and a == b


# --- typed field readers: each checks the JSON type and range, and names the field (never its value) ---------


def _value(d: Mapping[str, Any], name: str, where: str, default):
    if name in d:
        return d[name]
    if default is _REQUIRED:
        raise CheckpointError(f"{where}: the field {name!r} is missing")
    return default


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _got(value) -> str:
    return "" if _is_int(value) else f" (got {describe_type(value)})"


def _int(d: Mapping[str, Any], name: str, where: str, default, limit: str, *, low: int | None = None) -> int:
    value = _value(d, name, where, default)
    low = SIZE_LIMITS[limit][0] if low is None else low
    high = SIZE_LIMITS[limit][1]
    if not _is_int(value) or not low <= value <= high:
        raise CheckpointError(f"{where}: {name} must be an integer from {low} to {high}{_got(value)}")
    return value


def _single_int(d: Mapping[str, Any], name: str, where: str, default, limit: str) -> int:
    """Some fields may be per-level lists in diffusers; sdlab needs one value for all levels."""
    value = _value(d, name, where, default)
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: {name} differs between levels; sdlab needs one value for all levels")
        value = value[0]
    return _int({name: value}, name, where, _REQUIRED, limit)


def _per_level_int(d: Mapping[str, Any], name: str, where: str, levels: int, limit: str) -> int | tuple[int, ...]:
    """A field that is one integer for all levels or a list of one per level (diffusers writes SDXL's
    transformer depths as [1, 2, 10])."""
    value = _value(d, name, where, 1)
    if not isinstance(value, list):
        return _int(d, name, where, 1, limit)
    low, high = SIZE_LIMITS[limit]
    if len(value) != levels or not all(_is_int(v) and low <= v <= high for v in value):
        raise CheckpointError(
            f"{where}: {name} must be an integer from {low} to {high} or a list of {levels} of them (one per level)"
        )
    return value[0] if len(set(value)) == 1 else tuple(value)


def _channels(d: Mapping[str, Any], where: str) -> tuple[int, ...]:
    value = _value(d, "block_out_channels", where, _REQUIRED)
    low, high = SIZE_LIMITS["channels"]
    most = SIZE_LIMITS["levels"][1]
    fits = isinstance(value, list) and 1 <= len(value) <= most and all(_is_int(c) and low <= c <= high for c in value)
    if not fits:
        raise CheckpointError(
            f"{where}: block_out_channels must be a list of 1 to {most} integers from {low} to {high}"
            + ("" if isinstance(value, list) else f" (got {describe_type(value)})")
        )
    return tuple(value)


def _bool(d: Mapping[str, Any], name: str, where: str, default: bool, *, null: bool | None = None) -> bool:
    """A true/false field; `null` is what a JSON null means, for fields diffusers also accepts as null."""
    value = _value(d, name, where, default)
    if value is None and null is not None:
        return null
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {name} must be true or false (got {describe_type(value)})")
    return value


def _number(d: Mapping[str, Any], name: str, where: str, default: float, low: float, high: float) -> float:
    """A finite number in (low, high] (low excluded: scales and epsilons must be positive)."""
    value = _value(d, name, where, default)
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not low < value <= high:
        raise CheckpointError(
            f"{where}: {name} must be a number in ({low:g}, {high:g}]"
            + ("" if real else f" (got {describe_type(value)})")
        )
    return value


def _str_list(d: Mapping[str, Any], name: str, where: str, default) -> list[str] | None:
    value = _value(d, name, where, default)
    if value is None and default is None:
        return None
    most = SIZE_LIMITS["levels"][1]
    if not (isinstance(value, list) and len(value) <= most and all(isinstance(v, str) for v in value)):
        raise CheckpointError(f"{where}: {name} must be a list of at most {most} names")
    return value
