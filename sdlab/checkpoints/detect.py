"""Which model is this? Reading a `ModelConfig` off an original-layout (single-file) state dict.

Sizes come from tensor shapes, so non-standard models (other widths, levels, layers per block) work:

- family: OpenCLIP keys (`cond_stage_model.model.`) and a 1024-wide context mean SD 2.x; OpenAI CLIP keys
  (`cond_stage_model.transformer.`) and a 768-wide context mean SD 1.x;
- inpainting: 9 input channels in the UNet's first convolution (latents 4 + mask 1 + masked image 4);
- UNet levels/channels/layers per block: from where the downsampling convolutions (`input_blocks.N.0.op`)
  sit and the widths of the ResBlocks; attention levels from which blocks carry a transformer;
- text encoder depth: the layers present; for OpenCLIP, a file that carries the full trained tower (marked
  by its `text_projection`) has one layer more than SD 2 uses (it conditions on the penultimate one).

What shapes cannot tell is taken from the family: attention heads (SD 1.x: 8 heads; SD 2.x: 64 channels per
head), GroupNorm groups (32), the noise schedule (SD's scaled-linear 0.00085..0.012), VAE scaling 0.18215.

**Prediction (epsilon or v).** An original checkpoint has no flag for it. The rule, first match wins:
1. the `prediction=` argument; 2. safetensors metadata `prediction_type` (sdlab writes it) or
`modelspec.prediction_type` ("epsilon"/"v"); 3. a `v_pred` marker key in the state dict (a community
convention); 4. SD 1.x and all inpainting models: epsilon; 5. SD 2.x: epsilon when the Lightning checkpoint
records `global_step` 875000 (the 512-pixel SD 2.0 base), otherwise v-prediction at 768 pixels (SD 2.x-v,
as diffusers assumes too). A SD 2.x *base* model (512, epsilon) saved as safetensors therefore needs
`prediction="epsilon"`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping

import torch

from ..config import PRESETS, SD15, SD21, SD21_BASE, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError, ParameterError
from .configs import named_like_preset
from .convert import block_index, normalize_ldm_keys
from .io import quoted_key
from .keymaps import CLIP_ROOT, OPENCLIP_ROOT, UNET_ROOT, VAE_ROOT

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = (
    "SD 1.x (OpenAI CLIP ViT-L/14 text encoder, 768-wide context), SD 2.x (OpenCLIP ViT-H/14, 1024-wide "
    "context), and their 9-channel inpainting variants, in the original single-file layout "
    "(model.diffusion_model. / first_stage_model. / cond_stage_model.) or as a diffusers folder"
)
SD2_BASE_GLOBAL_STEP = "875000"
V_PRED_MARKERS = ("v_pred",)
UNSUPPORTED_MARKERS = {
    "conditioner.embedders.": "an SDXL-style model (its text encoders are under conditioner.embedders.)",
    UNET_ROOT + "label_emb.": "a class- or size-conditioned UNet (SDXL, or the x4 upscaler)",
}


def detect_family(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    prediction: str | None = None,
) -> ModelConfig:
    """The ModelConfig of an original-layout state dict (see the module docstring for the rules)."""
    state_dict = normalize_ldm_keys(state_dict)
    _reject_unsupported(state_dict)
    openclip = any(k.startswith(OPENCLIP_ROOT) for k in state_dict)
    try:  # the configs check their sizes: shapes of a damaged file can give impossible ones
        text = _openclip_config(state_dict) if openclip else _clip_config(state_dict)
        unet = _unet_config(state_dict, openclip)
        vae = _vae_config(state_dict)
        prediction = prediction or _prediction(state_dict, metadata or {}, openclip, unet.in_channels == 9)
        config = _assemble(text, unet, vae, prediction, openclip)
    except ParameterError as e:
        raise CheckpointError(f"unknown architecture: the weights' shapes give an unsupported model ({e})") from e
    family = ("sd2" if openclip else "sd1") + "-custom" + ("-inpaint" if config.is_inpainting else "")
    return named_like_preset(config, family)


def _assemble(
    text: TextEncoderConfig, unet: UNetConfig, vae: VAEConfig, prediction: str, openclip: bool
) -> ModelConfig:
    base = (SD21 if prediction == "v_prediction" else SD21_BASE) if openclip else SD15
    if openclip and prediction == "v_prediction":
        unet = dataclasses.replace(unet, upcast_attention=True)  # as SD 2.1-v's config has it
    return base.replace(text_encoder=text, unet=unet, vae=vae, prediction=prediction)


def _reject_unsupported(sd: Mapping[str, torch.Tensor]) -> None:
    for prefix, what in UNSUPPORTED_MARKERS.items():
        if any(k.startswith(prefix) for k in sd):
            raise CheckpointError(
                f"unsupported architecture: this looks like {what}. sdlab supports {SUPPORTED_FAMILIES}"
            )
    needed = {
        "UNet": UNET_ROOT + "input_blocks.0.0.weight",
        "VAE": VAE_ROOT + "encoder.conv_in.weight",
        "text encoder": (
            CLIP_ROOT + "text_model.embeddings.token_embedding.weight",
            OPENCLIP_ROOT + "token_embedding.weight",
        ),
    }
    absent = [part for part, keys in needed.items() if not any(k in sd for k in _as_tuple(keys))]
    if absent:
        examples = ", ".join(quoted_key(k) for k in list(sd)[:3])
        raise CheckpointError(
            f"unknown architecture: no {', no '.join(absent)} weights where a Stable Diffusion checkpoint has them "
            f"({len(sd)} keys, e.g. {examples}). sdlab supports {SUPPORTED_FAMILIES}"
        )


# --- UNet -----------------------------------------------------------------------------------------------


def _unet_config(sd: Mapping[str, torch.Tensor], openclip: bool) -> UNetConfig:
    p = UNET_ROOT
    conv_in = _get(sd, p + "input_blocks.0.0.weight", 4)  # (channels[0], in_channels, 3, 3)
    n, levels = _unet_layout(sd)
    first_blocks = [1 + level * (n + 1) for level in range(levels)]  # the first block of each level
    channels = tuple(_get(sd, f"{p}input_blocks.{b}.0.out_layers.3.weight", 4).shape[0] for b in first_blocks)
    attention = tuple(f"{p}input_blocks.{b}.1.proj_in.weight" in sd for b in first_blocks)
    mid = p + "middle_block.1."
    depth = len({m.group(1) for k in sd if (m := re.match(re.escape(mid) + r"transformer_blocks\.(\d+)\.", k))})
    heads = {"num_heads": None, "head_dim": 64} if openclip else {"num_heads": 8, "head_dim": None}
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=_get(sd, p + "out.2.weight", 4).shape[0],
        channels=channels,
        attention_levels=attention,
        layers_per_block=n,
        context_dim=_get(sd, mid + "transformer_blocks.0.attn2.to_k.weight", 2).shape[1],
        transformer_depth=depth,
        use_linear_projection=_get(sd, mid + "proj_in.weight", (2, 4)).ndim == 2,
        **heads,
    )


def _unet_layout(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(layers_per_block, levels): with n ResBlocks per level and a downsampling block between levels,
    the input blocks are conv_in, then n blocks, op, n blocks, op, ..., n blocks."""
    blocks = _indices(sd, UNET_ROOT + "input_blocks.")
    ops = sorted(b for b in blocks if UNET_ROOT + f"input_blocks.{b}.0.op.weight" in sd)
    count = max(blocks) + 1
    n = ops[0] - 1 if ops else count - 1
    levels = len(ops) + 1
    if n < 1 or count != 1 + levels * n + len(ops) or ops != [(i + 1) * (n + 1) for i in range(len(ops))]:
        raise CheckpointError(
            f"unknown UNet layout: {count} input blocks with downsampling at {ops} do not form levels of equal "
            f"size. sdlab supports {SUPPORTED_FAMILIES}"
        )
    return n, levels


# --- VAE ------------------------------------------------------------------------------------------------


def _vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    p = VAE_ROOT + "encoder.down."
    levels = _count_indices(sd, p)
    layers = _count_indices(sd, p + "0.block.")
    return VAEConfig(
        in_channels=_get(sd, VAE_ROOT + "encoder.conv_in.weight", 4).shape[1],
        out_channels=_get(sd, VAE_ROOT + "decoder.conv_out.weight", 4).shape[0],
        latent_channels=_get(sd, VAE_ROOT + "decoder.conv_in.weight", 4).shape[1],
        channels=tuple(_get(sd, f"{p}{i}.block.0.conv1.weight", 4).shape[0] for i in range(levels)),
        layers_per_block=layers,
    )


# --- text encoders --------------------------------------------------------------------------------------


def _clip_config(sd: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    p = CLIP_ROOT + "text_model."
    vocab, width = _get(sd, p + "embeddings.token_embedding.weight", 2).shape
    layers = _count_indices(sd, p + "encoder.layers.")
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=_get(sd, p + "embeddings.position_embedding.weight", 2).shape[0],
        width=width,
        num_layers=layers,
        num_heads=width // 64,  # CLIP's text towers use 64-channel heads
        mlp_width=_get(sd, p + "encoder.layers.0.mlp.fc1.weight", 2).shape[0],
        activation="quick_gelu",
        pad_token_id=49407,
    )


def _openclip_config(sd: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    p = OPENCLIP_ROOT
    vocab, width = _get(sd, p + "token_embedding.weight", 2).shape
    layers = _count_indices(sd, p + "transformer.resblocks.")
    if p + "text_projection" in sd:  # the full trained tower: SD 2 stops at its penultimate layer
        layers -= 1
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=_get(sd, p + "positional_embedding", 2).shape[0],
        width=width,
        num_layers=layers,
        num_heads=width // 64,
        mlp_width=_get(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", 2).shape[0],
        activation="gelu",
        pad_token_id=0,
    )


# --- prediction -----------------------------------------------------------------------------------------


def _prediction(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], openclip: bool, inpainting: bool) -> str:
    stated = metadata.get("prediction_type") or metadata.get("modelspec.prediction_type")
    if stated:
        return _normalize_prediction(stated)
    if any(k in sd for k in V_PRED_MARKERS):
        return "v_prediction"
    if not openclip or inpainting:
        return "epsilon"
    if metadata.get("global_step") == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    log.warning(
        "SD 2.x checkpoint without a prediction flag: assuming v-prediction at 768 px (SD 2.x-v). "
        "For a 512-px base model pass prediction='epsilon'."
    )
    return "v_prediction"


def _normalize_prediction(value: str) -> str:
    value = value.strip().lower()
    if value in ("epsilon", "eps"):
        return "epsilon"
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    raise CheckpointError("the checkpoint's metadata names an unknown prediction_type; expected 'epsilon' or 'v'")


# --- helpers --------------------------------------------------------------------------------------------


def _get(sd: Mapping[str, torch.Tensor], key: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """The weight `key`, checked to have `ndim` dimensions (one of them, for a tuple)."""
    if key not in sd:
        raise CheckpointError(
            f"unknown architecture: the weight {key!r} is missing. sdlab supports {SUPPORTED_FAMILIES}"
        )
    ndims = ndim if isinstance(ndim, tuple) else (ndim,)
    if sd[key].ndim not in ndims:
        raise CheckpointError(
            f"unknown architecture: the weight {key!r} has {sd[key].ndim} dimensions where a Stable Diffusion "
            f"checkpoint has {' or '.join(map(str, ndims))}"
        )
    return sd[key]


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> set[int]:
    """The numbers N of the sub-modules `prefix + "N."` (a non-numeric N is an error)."""
    return {block_index(k, prefix) for k in sd if k.startswith(prefix)}


def _count_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered sub-modules `prefix.N.` there are (N contiguous from 0)."""
    found = _indices(sd, prefix)
    if not found or found != set(range(len(found))):
        what = "none" if not found else "not numbered 0..N-1"
        raise CheckpointError(f"unknown architecture: the layers under {prefix!r} are {what}")
    return len(found)


def _as_tuple(keys) -> tuple[str, ...]:
    return keys if isinstance(keys, tuple) else (keys,)


def resolve_family(family: str | ModelConfig) -> ModelConfig:
    """A preset name ("sd15", "sd21", ...) or a ModelConfig -> ModelConfig."""
    if isinstance(family, ModelConfig):
        return family
    if family not in PRESETS:
        raise CheckpointError(f"unknown family {family!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[family]
