"""SDXL (Podell et al. 2023): two text encoders, a pooled text embedding and size conditions, a 3-level UNet.

    base:    OpenAI CLIP ViT-L/14 (768) + OpenCLIP ViT-bigG/14 (1280): both penultimate layers, raw,
             concatenated to a 2048-wide context; the pooled, projected end-of-text state of bigG's last
             layer (1280) + Fourier features of 6 numbers (original size, crop top-left, target size)
             form the added vector of the UNet's `text_time` embedding.
    refiner: bigG only (1280-wide context), 5 numbers (original size, crop, aesthetic score), 4 levels.

The refiner is a family of its own (`REFINER`, in this module): its networks differ (no first encoder),
and loading one where a base is expected (or the reverse) is an error that says so.

Single files keep the text encoders under Stability's `sgm` GeneralConditioner, `conditioner.embedders.N.`:
transformers' CLIPTextModel names under `0.transformer.` and OpenCLIP's own names under `1.model.` (the
refiner: `0.model.`), where `text_projection` is stored transposed (applied as x @ P). The UNet's added
MLP is `label_emb.0`. The VAE's latents are scaled by 0.13025; SDXL's VAE overflows in fp16, so its
config asks for `force_upcast` (decoding runs in fp32 when the model is fp16, as diffusers does).

The second prompt (`prompt_2`, as diffusers names it) is bigG's text; CLIP ViT-L encodes the first. Unset,
both encoders encode the one prompt. An empty negative prompt (empty for both encoders) conditions on zeros
(context and pooled), as diffusers (`force_zeros_for_empty_prompt` of the base's pipeline config) and A1111
do; the refiner encodes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..conditioning import chunk_prompts, encode_chunks
from ..config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..diffusion.conditioning import Conditioning, split_guidance
from ..errors import ParameterError
from ..nn.clip import TextEncoder
from . import ldm, sd1, sd2
from .base import Component, Family, KeyMap, StateDict, names_component

EMBEDDERS = "conditioner.embedders."
CLIP_L_ROOT = EMBEDDERS + "0.transformer."
BIGG_ROOT = EMBEDDERS + "1.model."
REFINER_BIGG_ROOT = EMBEDDERS + "0.model."
VAE_SCALE = 0.13025
AESTHETIC_FLAG = "requires_aesthetics_score"  # model_index.json of the refiner's pipeline
ZEROS_FLAG = "force_zeros_for_empty_prompt"

_CLIP_L = TextEncoderConfig()  # OpenAI CLIP ViT-L/14, as SD 1.x, padded with <|endoftext|>
_BIGG = TextEncoderConfig(width=1280, num_layers=32, num_heads=20, mlp_width=5120, activation="gelu",
                          pad_token_id=0, projection_dim=1280)  # OpenCLIP ViT-bigG/14, padded with "!"
_VAE = VAEConfig(scaling_factor=VAE_SCALE, force_upcast=True)
_SCHEDULE = ScheduleConfig()  # scaled-linear 0.00085..0.012, "leading" spacing with offset 1

SDXL_BASE = ModelConfig(
    name="sdxl-base", family="sdxl", text_encoder=_CLIP_L,
    unet=UNetConfig(channels=(320, 640, 1280), attention_levels=(False, True, True), context_dim=2048,
                    num_heads=None, head_dim=64, transformer_depth=(1, 2, 10), use_linear_projection=True,
                    added_condition="text_time", added_input_dim=1280 + 6 * 256, added_time_ids=6),
    vae=_VAE, schedule=_SCHEDULE, default_size=1024, default_guidance=5.0,
    extra_networks=(("text_encoder_2", _BIGG),),
)  # fmt: skip
SDXL_INPAINT = SDXL_BASE.replace(name="sdxl-inpaint", unet=dataclasses.replace(SDXL_BASE.unet, in_channels=9))
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner", family="sdxl-refiner", text_encoder=None,
    unet=UNetConfig(channels=(384, 768, 1536, 1536), attention_levels=(False, True, True, False),
                    context_dim=1280, num_heads=None, head_dim=64, transformer_depth=4, use_linear_projection=True,
                    added_condition="text_time", added_input_dim=1280 + 5 * 256, added_time_ids=5),
    vae=_VAE, schedule=_SCHEDULE, default_size=1024, default_guidance=5.0,
    extra_networks=(("text_encoder_2", _BIGG),),
)  # fmt: skip

# SDXL in miniature, for tests: the same structure (two encoders, no attention at the top level, deeper
# transformers below, heads of one size, the text_time embedding), milliseconds per step on a CPU.
_TINY_L = TextEncoderConfig(width=32, num_layers=3, num_heads=4, mlp_width=64)
_TINY_G = TextEncoderConfig(width=32, num_layers=3, num_heads=4, mlp_width=64, activation="gelu", pad_token_id=0,
                            projection_dim=32)
_TINY_VAE = VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8, scaling_factor=VAE_SCALE,
                      force_upcast=True)
TINY_SDXL = ModelConfig(
    name="tiny-sdxl", family="sdxl", text_encoder=_TINY_L,
    unet=UNetConfig(channels=(32, 64, 64), attention_levels=(False, True, True), context_dim=64, num_heads=None,
                    head_dim=8, transformer_depth=(1, 1, 2), use_linear_projection=True, norm_groups=8,
                    added_condition="text_time", added_input_dim=32 + 6 * 8, added_time_ids=6, added_time_dim=8),
    vae=_TINY_VAE, schedule=_SCHEDULE, default_size=64, default_guidance=5.0,
    extra_networks=(("text_encoder_2", _TINY_G),),
)  # fmt: skip
TINY_SDXL_REFINER = ModelConfig(
    name="tiny-sdxl-refiner", family="sdxl-refiner", text_encoder=None,
    unet=UNetConfig(channels=(32, 64, 64, 64), attention_levels=(False, True, True, False), context_dim=32,
                    num_heads=None, head_dim=8, transformer_depth=2, use_linear_projection=True, norm_groups=8,
                    layers_per_block=1, added_condition="text_time", added_input_dim=32 + 5 * 8, added_time_ids=5,
                    added_time_dim=8),
    vae=_TINY_VAE, schedule=_SCHEDULE, default_size=64, default_guidance=5.0,
    extra_networks=(("text_encoder_2", _TINY_G),),
)  # fmt: skip


def _configs():
    from ..checkpoints import configs

    return configs


TEXT_ENCODER = dataclasses.replace(sd1.COMPONENTS["text_encoder"], lora_prefix="lora_te1_",
                                   default_pad_token_id=49407)
TEXT_ENCODER_2 = Component(
    "text_encoder_2", lambda c: TextEncoder(c.network("text_encoder_2")), "transformers",
    ("CLIPTextModelWithProjection",), "model", TextEncoderConfig,
    read_config=lambda d, where, pad: _configs().text_encoder_from_transformers(d, pad, where),
    write_config=lambda cfg, model: _configs().text_encoder_to_transformers(cfg),
    tokenizer="tokenizer_2", lora_prefix="lora_te2_", default_pad_token_id=0,
)
# A diffusers UNet config does not say how many size numbers follow the pooled text in its added vector
# (the pipeline decides: base 6, refiner 5); SDXL's pipelines upcast an fp16 VAE when its config asks.
UNET = dataclasses.replace(
    sd1.COMPONENTS["unet"], read_config=lambda d, where, pad: _configs().unet_from_diffusers(d, where, added_time_ids=6))
REFINER_UNET = dataclasses.replace(
    UNET, read_config=lambda d, where, pad: _configs().unet_from_diffusers(d, where, added_time_ids=5))
VAE = dataclasses.replace(
    sd1.COMPONENTS["vae"], read_config=lambda d, where, pad: _configs().vae_from_diffusers(d, where, reads_force_upcast=True))


class SDXL(Family):
    """The SDXL base (and its 9-channel inpainting variant)."""

    name = "sdxl"
    label = "SDXL (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders, 2048-wide context)"
    presets = (SDXL_BASE, SDXL_INPAINT, TINY_SDXL)
    components = {"text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2, "unet": UNET, "vae": VAE}
    pipelines = {"txt2img": "StableDiffusionXLPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}
    task_pipelines = {"text2image": "StableDiffusionXLPipeline", "image2image": "StableDiffusionXLImg2ImgPipeline",
                      "inpainting": "StableDiffusionXLInpaintPipeline"}  # the refiner's too
    default_pad_token_id = 0
    default_guidance = 5.0  # StableDiffusionXLPipeline's guidance_scale
    diffusers_scheduler = "EulerDiscreteScheduler"
    zero_empty_negative = True  # diffusers' force_zeros_for_empty_prompt
    bigg_root = BIGG_ROOT

    # --- recognising files --------------------------------------------------------------------------

    def matches_keys(self, keys: Collection[str]) -> bool:
        return ldm.has_unet_and_vae(keys) and _has(keys, CLIP_L_ROOT) and _has(keys, BIGG_ROOT)

    def matches_folder(self, index: Mapping[str, Any], component_configs: Mapping[str, Mapping[str, Any]]) -> bool:
        return _is_xl_pipeline(index) and names_component(index, "text_encoder")

    def explain_mismatch(self, keys: Collection[str]) -> str | None:
        if not (ldm.has_unet_and_vae(keys) and _has(keys, EMBEDDERS)):
            return None
        if _has(keys, CLIP_L_ROOT) and not _has(keys, BIGG_ROOT):
            return (f"an SDXL base model without its second text encoder (OpenCLIP ViT-bigG under {BIGG_ROOT}); "
                    f"the file is incomplete")
        if _has(keys, BIGG_ROOT) and not _has(keys, CLIP_L_ROOT):
            return (f"an SDXL base model without its first text encoder (CLIP ViT-L under {CLIP_L_ROOT}); "
                    f"the file is incomplete")
        return "an SDXL-style model whose text encoders under conditioner.embedders. are not SDXL's"

    def normalize_keys(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        return sd1.with_text_model_level(state_dict, CLIP_L_ROOT)

    def config_from_state_dict(self, state_dict, metadata, prediction) -> ModelConfig:
        sd = self.normalize_keys(state_dict)
        bigg = sd2.openclip_config(sd, self.bigg_root, projected=True)
        unet = ldm.unet_config(sd, added_pooled_dim=bigg.projection_dim, num_heads=None, head_dim=64)
        preset = self.presets[0]
        return preset.replace(
            text_encoder=self._first_encoder(sd),
            unet=unet,
            vae=ldm.vae_config(sd, scaling_factor=VAE_SCALE, force_upcast=True),
            prediction=prediction or ldm.stated_prediction(sd, metadata) or "epsilon",
            extra_networks=(("text_encoder_2", bigg),),
        )

    def _first_encoder(self, sd) -> TextEncoderConfig | None:
        return sd1.clip_config(sd, CLIP_L_ROOT)

    def keymaps(self, config: ModelConfig) -> dict[str, KeyMap]:
        maps = {"unet": ldm.unet_keymap(config.unet), "vae": ldm.vae_keymap(config.vae),
                "text_encoder_2": sd2.openclip_keymap(config.network("text_encoder_2"), self.bigg_root)}
        if "text_encoder" in self.components:
            maps["text_encoder"] = sd1.clip_keymap(config.text_encoder, CLIP_L_ROOT)
        return maps

    def model_index_extras(self, config: ModelConfig) -> dict[str, Any]:
        return {ZEROS_FLAG: self.zero_empty_negative}

    # --- conditioning -------------------------------------------------------------------------------

    def clip_skip_limit(self, config: ModelConfig) -> int:
        return super().clip_skip_limit(config) - 1  # clip skip 1 is already the penultimate layer

    def condition(self, model, prompts, negatives, params, *, prompts_2=None, negatives_2=None,
                  zero_empty_negatives=None):
        """CLIP ViT-L encodes `prompts` (and `negatives`), bigG `prompts_2` (and `negatives_2`; None: the
        same texts), as diffusers' prompt / prompt_2; the pooled vector is bigG's. Negatives and prompts go
        through each encoder in one call, padded to one number of chunks."""
        b = len(prompts)
        texts, texts_2 = prompts, _or_same(prompts_2, prompts)
        if negatives is not None:
            negatives_2 = _or_same(negatives_2, negatives)
            texts, texts_2 = negatives + texts, negatives_2 + texts_2
        context, pooled = self.encode_text(model, texts, params.clip_skip, texts_2=texts_2)
        zeros = self.zero_empty_negative if zero_empty_negatives is None else zero_empty_negatives
        if negatives is not None and zeros:  # a negative prompt empty for both encoders: zeros
            empty = [first == "" and second == "" for first, second in zip(negatives, negatives_2)]
            empty = torch.tensor(empty + [False] * b, device=context.device)  # (2B,)
            context, pooled = context.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        numbers = [self.time_ids(params, negative=False)] * b
        if negatives is not None:
            numbers = [self.time_ids(params, negative=True)] * b + numbers
        time_ids = torch.tensor(numbers, dtype=pooled.dtype, device=pooled.device)  # (B, 6) or (2B, 6)
        both = Conditioning(context=context.to(model.dtype), added=torch.cat([pooled, time_ids], 1).to(model.dtype))
        return split_guidance(both, negatives is not None)

    def encode_text(self, model, texts: list[str], clip_skip: int = 1, *,
                    texts_2: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> (context (B, 77 N, 2048 or 1280), pooled (B, 1280)): each encoder's penultimate layer
        (clip skip 1; k skips k - 1 more), emphasis applied to each, concatenated; bigG's pooled output.
        CLIP ViT-L encodes `texts`, bigG `texts_2` (None: `texts`); the refiner has bigG only."""
        texts_of = {"text_encoder": texts, "text_encoder_2": _or_same(texts_2, texts)}
        encoders = [(model.tokenizers[self.components[n].tokenizer], model.components[n], texts_of[n])
                    for n in self.text_encoders]
        chunked = [chunk_prompts(tokenizer, own) for tokenizer, _, own in encoders]
        n = max(len(c) for prompts in chunked for c in prompts)  # both encoders' contexts stack along features
        outputs = [encode_chunks(tok, enc, chunks, clip_skip + 1, raw=True, n_chunks=n)
                   for (tok, enc, _), chunks in zip(encoders, chunked)]
        return torch.cat([hidden for hidden, _ in outputs], dim=-1), outputs[-1][1]

    def time_ids(self, params, negative: bool) -> list[float]:
        """The base's 6 numbers: original size (h, w), crop top-left (top, left), target size (h, w)."""
        original, crop, target = params.size_conditions(negative)
        return [*original, *crop, *target]

    # --- training -----------------------------------------------------------------------------------

    def conditioner_inputs(self, model, prompts, extras=None) -> dict[str, torch.Tensor]:
        """Token ids per encoder (B, T) and the time ids (B, N): each sample's original size and crop (from
        the data: `extras[i]` with "original_size" (h, w) and "crop_top_left" (top, left)), target size the
        training resolution ("target_size", else the original size)."""
        inputs = {}
        for name in self.text_encoders:
            tokenizer = model.tokenizers[self.components[name].tokenizer]
            inputs[name] = tokenizer(prompts, max_length=model.config.network(name).max_length).to(model.device)
        numbers = [self.training_time_ids(extra or {}, model.config.default_size)
                   for extra in (extras or [None] * len(prompts))]
        inputs["time_ids"] = torch.tensor(numbers, dtype=torch.float32, device=model.device)
        return inputs

    def training_time_ids(self, extra: Mapping[str, Any], size: int) -> list[float]:
        original = tuple(extra.get("original_size", (size, size)))
        return [*original, *extra.get("crop_top_left", (0, 0)), *extra.get("target_size", original)]

    def condition_from_inputs(self, networks, inputs) -> Conditioning:
        outputs = [networks[name].encode(inputs[name], clip_skip=2) for name in self.text_encoders]
        context = torch.cat([hidden for hidden, _ in outputs], dim=-1)
        pooled = outputs[-1][1]
        return Conditioning(context=context, added=torch.cat([pooled, inputs["time_ids"].to(pooled.dtype)], 1))


class SDXLRefiner(SDXL):
    """The SDXL refiner: bigG only, aesthetic-score conditioning; runs the last steps of a base's schedule."""

    name = "sdxl-refiner"
    label = "SDXL refiner (OpenCLIP ViT-bigG/14 text encoder, 1280-wide context, aesthetic-score conditioning)"
    presets = (SDXL_REFINER, TINY_SDXL_REFINER)
    components = {"text_encoder_2": TEXT_ENCODER_2, "unet": REFINER_UNET, "vae": VAE}
    pipelines = {"txt2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}
    zero_empty_negative = False
    bigg_root = REFINER_BIGG_ROOT

    def matches_keys(self, keys: Collection[str]) -> bool:
        return (ldm.has_unet_and_vae(keys) and _has(keys, REFINER_BIGG_ROOT)
                and not _has(keys, EMBEDDERS + "1."))

    def matches_folder(self, index, component_configs) -> bool:
        return _is_xl_pipeline(index) and not names_component(index, "text_encoder")

    def explain_mismatch(self, keys):
        return None  # the base's explanation covers files with embedders

    def normalize_keys(self, state_dict):
        return dict(state_dict)

    def _first_encoder(self, sd):
        return None

    def model_index_extras(self, config: ModelConfig) -> dict[str, Any]:
        return {ZEROS_FLAG: False, AESTHETIC_FLAG: True, "text_encoder": [None, None], "tokenizer": [None, None]}

    def time_ids(self, params, negative: bool) -> list[float]:
        """The refiner's 5 numbers: original size (h, w), crop top-left (top, left), aesthetic score."""
        original, crop, _ = params.size_conditions(negative)
        return [*original, *crop, params.negative_aesthetic_score if negative else params.aesthetic_score]

    def training_time_ids(self, extra, size):
        original = tuple(extra.get("original_size", (size, size)))
        return [*original, *extra.get("crop_top_left", (0, 0)), extra.get("aesthetic_score", 6.0)]


def _or_same(seconds: list[str] | None, firsts: list[str]) -> list[str]:
    """The second text encoder's texts: `seconds`, or the first encoder's when None (one per image)."""
    if seconds is None:
        return firsts
    if len(seconds) != len(firsts):
        raise ParameterError(f"got {len(seconds)} second-encoder texts (prompt_2) for {len(firsts)} prompts; "
                             f"give one per prompt")
    return list(seconds)


def _has(keys: Collection[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _is_xl_pipeline(index: Mapping[str, Any]) -> bool:
    return names_component(index, "unet") and names_component(index, "text_encoder_2")


FAMILY = SDXL()
REFINER = SDXLRefiner()
