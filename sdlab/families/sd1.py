"""SD 1.x: OpenAI CLIP ViT-L/14 text encoder (768-wide context), 8 attention heads at every UNet level.

Single files keep transformers' CLIPTextModel names under `cond_stage_model.transformer.`; diffusers
folders have a CLIPTextModel with QuickGELU activations. The built-in shapes model is of this family too
(its own small sizes and zero-terminal-SNR schedule live in its folder's configs).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..conditioning import encode_prompts
from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..diffusion.conditioning import Conditioning, split_guidance
from ..nn.clip import TextEncoder
from ..nn.unet import UNet
from ..nn.vae import VAE
from . import ldm
from .base import Component, Family, KeyMap, StateDict

CLIP_ROOT = "cond_stage_model.transformer."
TEXT_MODEL = "text_model."
CLIP_IGNORED = ("text_model.embeddings.position_ids",)  # a constant buffer (0..76) old transformers saved

SD15 = ModelConfig(name="sd15")
SD15_INPAINT = ModelConfig(name="sd15-inpaint", unet=UNetConfig(in_channels=9))
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

# SD 1.x and 2.x have the same three networks (their sizes differ, in the config).
COMPONENTS = {
    "text_encoder": Component(
        "text_encoder", lambda c: TextEncoder(c.text_encoder), "transformers",
        ("CLIPTextModel", "CLIPTextModelWithProjection"), "model", TextEncoderConfig,
        read_config=lambda d, where, pad: _configs().text_encoder_from_transformers(d, pad, where),
        write_config=lambda cfg, model: _configs().text_encoder_to_transformers(cfg),
        tokenizer="tokenizer", lora_prefix="lora_te_",
    ),
    "unet": Component(
        "unet", lambda c: UNet(c.unet), "diffusers", ("UNet2DConditionModel",), "diffusion_pytorch_model",
        UNetConfig,
        read_config=lambda d, where, pad: _configs().unet_from_diffusers(d, where),
        write_config=lambda cfg, model: _configs().unet_to_diffusers(cfg, model.default_size // model.vae.downscale),
        lora_prefix="lora_unet_",
    ),
    "vae": Component(
        "vae", lambda c: VAE(c.vae), "diffusers", ("AutoencoderKL",), "diffusion_pytorch_model", VAEConfig,
        read_config=lambda d, where, pad: _configs().vae_from_diffusers(d, where),
        write_config=lambda cfg, model: _configs().vae_to_diffusers(cfg, model.default_size),
    ),
}


def _configs():
    """The config.json translators (imported on use: `sdlab.checkpoints` imports the families)."""
    from ..checkpoints import configs

    return configs


PIPELINES = {"txt2img": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
TASK_PIPELINES = {"text2image": "StableDiffusionPipeline", "image2image": "StableDiffusionImg2ImgPipeline",
                  "inpainting": "StableDiffusionInpaintPipeline"}


class TextContextConditioner:
    """The conditioner of SD 1.x and 2.x (a Family mixin): the text encoder's hidden states are the whole
    conditioning, no pooled vector or added conditions."""

    def condition(self, model, prompts, negatives, params, *, prompts_2=None, negatives_2=None,
                  zero_empty_negatives=None):
        """Prompts and negatives in one encoder call, so that both are padded to the same number of chunks.
        (Every negative prompt is encoded, the empty one too: SD 1.x/2.x have no zeroing rule.) Their one
        text encoder takes no second prompt: texts in `prompts_2` / `negatives_2` must equal the first."""
        self.check_second_prompts(model.config, "prompt_2", prompts, prompts_2)
        if negatives is not None:
            self.check_second_prompts(model.config, "negative_prompt_2", negatives, negatives_2)
        texts = prompts if negatives is None else negatives + prompts
        return split_guidance(text_conditioning(model, texts, params.clip_skip), negatives is not None)

    def conditioner_inputs(self, model, prompts, extras=None) -> dict[str, torch.Tensor]:
        return token_ids(model, prompts)

    def condition_from_inputs(self, networks, inputs) -> Conditioning:
        return context_of_ids(networks, inputs)


class SD1(TextContextConditioner, Family):
    name = "sd1"
    label = "SD 1.x (OpenAI CLIP ViT-L/14 text encoder, 768-wide context)"
    presets = (SD15, SD15_INPAINT, TINY)
    components = COMPONENTS
    pipelines = PIPELINES
    task_pipelines = TASK_PIPELINES
    default_pad_token_id = 49407  # <|endoftext|>

    def matches_keys(self, keys: Collection[str]) -> bool:
        return ldm.has_unet_and_vae(keys) and any(k.startswith(CLIP_ROOT) for k in keys)

    def matches_folder(self, index: Mapping[str, Any], component_configs: Mapping[str, Mapping[str, Any]]) -> bool:
        text = component_configs.get("text_encoder", {})
        return is_sd_pipeline(index) and text.get("hidden_act", "quick_gelu") == "quick_gelu"

    def normalize_keys(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        return with_text_model_level(state_dict, CLIP_ROOT)

    def config_from_state_dict(self, state_dict, metadata, prediction) -> ModelConfig:
        sd = self.normalize_keys(state_dict)
        return SD15.replace(
            text_encoder=clip_config(sd),
            unet=ldm.unet_config(sd, num_heads=8, head_dim=None),
            vae=ldm.vae_config(sd),
            prediction=prediction or ldm.stated_prediction(sd, metadata) or "epsilon",
        )

    def keymaps(self, config: ModelConfig) -> dict[str, KeyMap]:
        return ldm.keymaps(config, clip_keymap(config.text_encoder))

    def model_index_extras(self, config: ModelConfig) -> dict[str, Any]:
        return NO_SAFETY_CHECKER


def text_conditioning(model, prompts: list[str], clip_skip: int = 1) -> Conditioning:
    """SD 1.x/2.x condition on the text encoder's hidden states only: context (B, 77 N, D)."""
    return Conditioning(context=encode_prompts(model.tokenizer, model.text_encoder, prompts, clip_skip).to(model.dtype))


def token_ids(model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x: the text encoder's token ids (B, T), T its own context length; no extra conditions."""
    ids = model.tokenizer(prompts, max_length=model.config.text_encoder.max_length)
    return {"text_encoder": ids.to(model.device)}


def context_of_ids(networks: Mapping[str, torch.nn.Module], inputs: Mapping[str, torch.Tensor]) -> Conditioning:
    return Conditioning(context=networks["text_encoder"](inputs["text_encoder"]))  # context (B, T, D)


def with_text_model_level(state_dict: Mapping[str, torch.Tensor], root: str) -> StateDict:
    """Files made with old transformers versions store a CLIP text encoder without the `text_model.` level."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(root) and not key.startswith(root + TEXT_MODEL):
            key = root + TEXT_MODEL + key[len(root):]
        out[key] = value
    return out


# What SD 1.x/2.x model_index.json files say of the safety checker, which sdlab neither has nor writes.
NO_SAFETY_CHECKER = {"feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None]}


def is_sd_pipeline(index: Mapping[str, Any]) -> bool:
    """A StableDiffusion(Inpaint)Pipeline-shaped model index: unet, vae and one text encoder (SD 1.x and 2.x)."""
    return "unet" in index and "text_encoder" in index and "text_encoder_2" not in index


def clip_keymap(cfg: TextEncoderConfig, root: str = CLIP_ROOT) -> KeyMap:
    """SD 1.x keeps transformers' CLIPTextModel names under `cond_stage_model.transformer.` (SDXL's first
    encoder under `conditioner.embedders.0.transformer.`)."""
    pairs = [
        ("text_model.embeddings.token_embedding", "text_model.embeddings.token_embedding"),
        ("text_model.embeddings.position_embedding", "text_model.embeddings.position_embedding"),
        *[(f"text_model.encoder.layers.{i}", f"text_model.encoder.layers.{i}") for i in range(cfg.num_layers)],
        ("text_model.final_layer_norm", "text_model.final_layer_norm"),
    ]
    return KeyMap(root, tuple(pairs), ignored=CLIP_IGNORED)


def clip_config(sd: Mapping[str, torch.Tensor], root: str = CLIP_ROOT) -> TextEncoderConfig:
    """An OpenAI CLIP text tower's config from its shapes (transformers' names under `root`)."""
    p = root + "text_model."
    vocab, width = ldm.get(sd, p + "embeddings.token_embedding.weight", 2).shape
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=ldm.get(sd, p + "embeddings.position_embedding.weight", 2).shape[0],
        width=width,
        num_layers=ldm.count_indices(sd, p + "encoder.layers."),
        num_heads=width // 64,  # CLIP's text towers use 64-channel heads
        mlp_width=ldm.get(sd, p + "encoder.layers.0.mlp.fc1.weight", 2).shape[0],
        activation="quick_gelu",
        pad_token_id=49407,
    )


FAMILY = SD1()
