"""SD 2.x: OpenCLIP ViT-H/14 text encoder (1024-wide context, conditioned on its penultimate layer), UNet
attention heads of 64 channels with linear projections; the 768-pixel models predict v.

Single files keep OpenCLIP's own names under `cond_stage_model.model.` (attention q/k/v fused into one
`in_proj` matrix); diffusers folders have a CLIPTextModel with GELU activations and 23 of the 24 layers.

**Prediction.** Beyond what a file states (`ldm.stated_prediction`): inpainting models predict epsilon; so
does the 512-pixel SD 2.0 base, recognised by its Lightning `global_step` 875000; any other SD 2.x single
file is taken to be SD 2.x-v (v-prediction at 768 pixels, as diffusers assumes too). A SD 2.x *base* model
saved as safetensors therefore needs `prediction="epsilon"`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..config import ModelConfig, TextEncoderConfig, UNetConfig
from . import ldm
from .base import Family, KeyMap
from .sd1 import COMPONENTS, NO_SAFETY_CHECKER, PIPELINES, TASK_PIPELINES, TextContextConditioner, is_sd_pipeline

log = logging.getLogger(__name__)

OPENCLIP_ROOT = "cond_stage_model.model."
OPENCLIP_GLOBALS = [
    ("token_embedding", "text_model.embeddings.token_embedding"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),  # a bare Parameter in OpenCLIP
    ("ln_final", "text_model.final_layer_norm"),
]
OPENCLIP_LAYER = [
    ("ln_1", "layer_norm1"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
OPENCLIP_RESBLOCKS = "transformer.resblocks."
# OpenCLIP's projection to the joint image-text space and its contrastive temperature are unused by SD,
# which conditions on per-token hidden states; `visual` is the image tower; attn_mask a constant buffer.
OPENCLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask", "visual")
SD2_BASE_GLOBAL_STEP = "875000"

_OPENCLIP_H = TextEncoderConfig(
    width=1024, num_layers=23, num_heads=16, mlp_width=4096, activation="gelu", pad_token_id=0
)
_SD2_UNET = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_projection=True)

SD21_BASE = ModelConfig(name="sd21-base", family="sd2", text_encoder=_OPENCLIP_H, unet=_SD2_UNET)
SD21 = ModelConfig(
    name="sd21",
    family="sd2",
    text_encoder=_OPENCLIP_H,
    unet=dataclasses.replace(_SD2_UNET, upcast_attention=True),
    prediction="v_prediction",
    default_size=768,
)
SD2_INPAINT = ModelConfig(
    name="sd2-inpaint", family="sd2", text_encoder=_OPENCLIP_H, unet=dataclasses.replace(_SD2_UNET, in_channels=9)
)


class SD2(TextContextConditioner, Family):
    name = "sd2"
    label = "SD 2.x (OpenCLIP ViT-H/14 text encoder, 1024-wide context)"
    presets = (SD21_BASE, SD21, SD2_INPAINT)
    components = COMPONENTS
    pipelines = PIPELINES
    task_pipelines = TASK_PIPELINES
    default_pad_token_id = 0  # "!"

    def matches_keys(self, keys: Collection[str]) -> bool:
        return ldm.has_unet_and_vae(keys) and any(k.startswith(OPENCLIP_ROOT) for k in keys)

    def matches_folder(self, index: Mapping[str, Any], component_configs: Mapping[str, Mapping[str, Any]]) -> bool:
        text = component_configs.get("text_encoder", {})
        return is_sd_pipeline(index) and text.get("hidden_act") == "gelu"

    def config_from_state_dict(self, state_dict, metadata, prediction) -> ModelConfig:
        unet = ldm.unet_config(state_dict, num_heads=None, head_dim=64)
        prediction = prediction or ldm.stated_prediction(state_dict, metadata) or _assumed_prediction(
            metadata, inpainting=unet.in_channels == 9)
        base = SD21 if prediction == "v_prediction" else SD21_BASE
        if prediction == "v_prediction":
            unet = dataclasses.replace(unet, upcast_attention=True)  # as SD 2.1-v's config has it
        return base.replace(text_encoder=openclip_config(state_dict), unet=unet, vae=ldm.vae_config(state_dict),
                            prediction=prediction)

    def keymaps(self, config: ModelConfig) -> dict[str, KeyMap]:
        return ldm.keymaps(config, openclip_keymap(config.text_encoder))

    def model_index_extras(self, config: ModelConfig) -> dict[str, Any]:
        return NO_SAFETY_CHECKER


def openclip_keymap(cfg: TextEncoderConfig, root: str = OPENCLIP_ROOT) -> KeyMap:
    """OpenCLIP's own names under `cond_stage_model.model.` (SDXL: `conditioner.embedders.N.model.`). Only
    the first `num_layers` resblocks are mapped; a 24th (SD 2 conditions on the penultimate layer) is left
    out, as diffusers does. With a `projection_dim` (SDXL) the text projection is mapped, transposed."""
    pairs = list(OPENCLIP_GLOBALS)
    fused = []
    for i in range(cfg.num_layers):
        ours = f"text_model.encoder.layers.{i}"
        pairs += [(f"{OPENCLIP_RESBLOCKS}{i}.{a}", f"{ours}.{b}") for a, b in OPENCLIP_LAYER]
        fused.append((f"{OPENCLIP_RESBLOCKS}{i}.attn.in_proj", f"{ours}.self_attn"))
    projected = cfg.projection_dim is not None
    ignored = tuple(k for k in OPENCLIP_IGNORED if not (projected and k == "text_projection"))
    transposed = (("text_projection", "text_projection.weight"),) if projected else ()
    return KeyMap(root, tuple(pairs), fused_qkv=tuple(fused), ignored=ignored, transposed=transposed,
                  unused_blocks=((OPENCLIP_RESBLOCKS, cfg.num_layers),))


def openclip_config(sd: Mapping[str, torch.Tensor], root: str = OPENCLIP_ROOT, *, projected: bool = False
                    ) -> TextEncoderConfig:
    """An OpenCLIP text tower's config from its shapes. SD 2.x (`projected=False`) stops at the penultimate
    layer of a full tower; SDXL keeps all layers and the text projection (its pooled output needs both)."""
    p = root
    vocab, width = ldm.get(sd, p + "token_embedding.weight", 2).shape
    layers = ldm.count_indices(sd, p + OPENCLIP_RESBLOCKS)
    if p + "text_projection" in sd and not projected:  # the full trained tower: SD 2 stops at its penultimate
        layers -= 1
    projection = ldm.get(sd, p + "text_projection", 2).shape[1] if projected else None
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=ldm.get(sd, p + "positional_embedding", 2).shape[0],
        width=width,
        num_layers=layers,
        num_heads=width // 64,
        mlp_width=ldm.get(sd, p + OPENCLIP_RESBLOCKS + "0.mlp.c_fc.weight", 2).shape[0],
        activation="gelu",
        pad_token_id=0,
        projection_dim=projection,
    )


def _assumed_prediction(metadata: Mapping[str, str], *, inpainting: bool) -> str:
    if inpainting or metadata.get("global_step") == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    log.warning(
        "SD 2.x checkpoint without a prediction flag: assuming v-prediction at 768 px (SD 2.x-v). "
        "For a 512-px base model pass prediction='epsilon'."
    )
    return "v_prediction"


FAMILY = SD2()
