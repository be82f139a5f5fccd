"""Shared builders for the checkpoint tests (no tests here): reference diffusers/transformers networks made
from sdlab configs through `sdlab.checkpoints.configs`, and tiny SD1-like / SD2-like configs."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlab.checkpoints import configs
from sdlab.config import TINY, ModelConfig

TINY_SD1 = TINY.replace(
    name="tiny-sd1",
    unet=dataclasses.replace(TINY.unet, num_heads=4, head_dim=None, transformer_depth=2),
)
TINY_SD2 = TINY.replace(
    name="tiny-sd2",
    family="sd2",
    text_encoder=dataclasses.replace(TINY.text_encoder, activation="gelu", pad_token_id=0),
    unet=dataclasses.replace(TINY.unet, use_linear_projection=True, attention_levels=(True, True)),
    prediction="v_prediction",
)
TINY_SD1_INPAINT = TINY_SD1.replace(name="tiny-sd1-inpaint", unet=dataclasses.replace(TINY_SD1.unet, in_channels=9))
TINY_CONFIGS = [TINY_SD1, TINY_SD2, TINY_SD1_INPAINT]


def _kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def reference_networks(config: ModelConfig, device: str = "cpu") -> dict[str, torch.nn.Module]:
    """diffusers' UNet and VAE and transformers' CLIPTextModel, built from `config` via sdlab's translation."""
    with torch.device(device):
        unet = UNet2DConditionModel(**_kwargs(configs.unet_to_diffusers(config.unet, 8)))
        vae = AutoencoderKL(**_kwargs(configs.vae_to_diffusers(config.vae, 64)))
        text = CLIPTextModel(CLIPTextConfig(**configs.text_encoder_to_transformers(config.text_encoder)))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def reference_state_dicts(config: ModelConfig, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """The three reference state dicts in the diffusers layout (text encoder keys with `text_model.`, as SD's
    published files and sdlab's TextEncoder have them; transformers >= 5 drops that prefix)."""
    nets = reference_networks(config, device)
    states = {name: dict(net.state_dict()) for name, net in nets.items()}
    states["text_encoder"] = {
        (k if k.startswith("text_model.") else "text_model." + k): v for k, v in states["text_encoder"].items()
    }
    if device != "meta":  # distinctive values everywhere, so a swapped tensor cannot go unnoticed
        states = {
            n: {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
            for n, sd in states.items()
        }
    return states


def assert_same_state_dict(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, values: bool = True):
    assert sorted(actual) == sorted(expected), (
        sorted(set(actual) - set(expected))[:5],
        sorted(set(expected) - set(actual))[:5],
    )
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        if values:
            assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
            assert torch.equal(got, want), key
