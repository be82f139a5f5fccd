"""Family detection from keys and shapes (sdlab.checkpoints.detect), and config.json translation
(sdlab.checkpoints.configs)."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_checkpoints_support import reference_state_dicts

from sdlab.checkpoints import configs, detect_family, diffusers_to_ldm
from sdlab.checkpoints.detect import resolve_family
from sdlab.config import PRESETS, SD2_INPAINT, SD15, SD15_INPAINT, SD21, SD21_BASE, UNetConfig, VAEConfig
from sdlab.errors import CheckpointError


def _ldm(config):
    return diffusers_to_ldm(reference_state_dicts(config, device="meta"), config)


@pytest.fixture(scope="module")
def sd15_ldm():
    return _ldm(SD15)


@pytest.fixture(scope="module")
def sd21_ldm():
    return _ldm(SD21)


def test_sd15(sd15_ldm):
    assert detect_family(sd15_ldm) == SD15


def test_sd15_inpainting():
    assert detect_family(_ldm(SD15_INPAINT)) == SD15_INPAINT


def test_sd2_inpainting_is_epsilon():
    assert detect_family(_ldm(SD2_INPAINT)) == SD2_INPAINT


def test_sd2_defaults_to_v_prediction_at_768(sd21_ldm):
    assert detect_family(sd21_ldm) == SD21


def test_sd2_base_by_global_step_or_argument(sd21_ldm):
    assert detect_family(sd21_ldm, {"global_step": "875000"}) == SD21_BASE
    assert detect_family(sd21_ldm, prediction="epsilon") == SD21_BASE


def test_prediction_from_metadata_and_marker_key(sd15_ldm, sd21_ldm):
    assert detect_family(sd21_ldm, {"prediction_type": "epsilon"}).prediction == "epsilon"
    assert detect_family(sd15_ldm, {"modelspec.prediction_type": "v"}).prediction == "v_prediction"
    assert detect_family({**sd15_ldm, "v_pred": torch.zeros(())}).prediction == "v_prediction"


def test_openclip_file_with_full_tower_uses_the_penultimate_layer(sd21_ldm):
    """Released SD 2 files carry all 24 OpenCLIP layers and the text projection; SD 2 uses 23."""
    full = dict(sd21_ldm)
    full.update({k.replace("resblocks.22.", "resblocks.23."): v for k, v in sd21_ldm.items() if "resblocks.22." in k})
    full["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    assert detect_family(full).text_encoder.num_layers == 23
    del full["cond_stage_model.model.text_projection"]  # a 24-layer file that is not the trained tower
    assert detect_family(full).text_encoder.num_layers == 24


def test_non_standard_sizes_are_read_from_shapes():
    custom = SD15.replace(
        name="sd1-custom",
        unet=UNetConfig(
            channels=(64, 128, 192),
            attention_levels=(False, True, True),
            layers_per_block=1,
            transformer_depth=2,
            in_channels=4,
            out_channels=8,
        ),
        vae=VAEConfig(channels=(32, 64, 64), layers_per_block=3, latent_channels=8),
        text_encoder=dataclasses.replace(SD15.text_encoder, width=128, num_layers=5, num_heads=2, mlp_width=256),
    )
    assert detect_family(_ldm(custom)) == custom


def test_sdxl_like_file_is_refused_naming_the_supported_families(sd15_ldm):
    sdxl = {k: v for k, v in sd15_ldm.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.zeros(1280)
    sdxl["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(1280, 2816)
    with pytest.raises(CheckpointError, match=r"SDXL.*SD 1\.x.*SD 2\.x"):
        detect_family(sdxl)


def test_random_state_dict_is_refused():
    with pytest.raises(CheckpointError, match=r"unknown architecture.*SD 1\.x.*SD 2\.x"):
        detect_family({"encoder.layer.0.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)})


def test_family_names():
    assert resolve_family("sd21") is SD21
    assert resolve_family(SD15) is SD15
    with pytest.raises(CheckpointError, match="sd15"):
        resolve_family("sdxl")


# --- config.json translation ----------------------------------------------------------------------------

SD15_UNET_JSON = {  # the fields of runwayml/stable-diffusion-v1-5's unet/config.json
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
SD21_UNET_JSON = {  # stabilityai/stable-diffusion-2-1: heads per level in attention_head_dim
    **SD15_UNET_JSON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "sample_size": 96, "dual_cross_attention": False,
}  # fmt: skip


def test_released_unet_configs_translate_to_the_presets():
    assert configs.unet_from_diffusers(SD15_UNET_JSON) == SD15.unet
    assert configs.unet_from_diffusers(SD21_UNET_JSON) == SD21.unet


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if not c.family.startswith("sdxl")))  # SD 1.x/2.x
def test_config_translation_round_trips(name):
    config = PRESETS[name]
    assert configs.unet_from_diffusers(configs.unet_to_diffusers(config.unet, 64)) == config.unet
    assert configs.vae_from_diffusers(configs.vae_to_diffusers(config.vae, 512)) == config.vae
    text = configs.text_encoder_to_transformers(config.text_encoder)
    assert configs.text_encoder_from_transformers(text, config.text_encoder.pad_token_id) == config.text_encoder
    assert configs.schedule_from_diffusers(configs.schedule_to_diffusers(config.schedule, config.prediction)) == (
        config.schedule,
        config.prediction,
    )
    assert configs.config_from_json(configs.config_to_json(config), "test") == config


def test_diffusers_builds_the_heads_we_mean():
    unet = UNet2DConditionModel(
        **{k: v for k, v in configs.unet_to_diffusers(PRESETS["tiny"].unet, 8).items() if k[0] != "_"}
    )
    heads = [
        block.attentions[0].transformer_blocks[0].attn1.heads
        for block in unet.down_blocks
        if hasattr(block, "attentions")
    ]
    assert heads == [PRESETS["tiny"].unet.heads_at(0)]


@pytest.mark.parametrize("change, field", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types"),
    ({"attention_head_dim": [5, 7, 20, 20]}, "attention_head_dim"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
    ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),  # one per level, or one
])  # fmt: skip
def test_unsupported_unet_settings_are_named(change, field):
    with pytest.raises(CheckpointError, match=field):
        configs.unet_from_diffusers({**SD15_UNET_JSON, **change})


def test_unsupported_scheduler_and_text_encoder():
    with pytest.raises(CheckpointError, match="beta_schedule"):
        configs.schedule_from_diffusers({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(CheckpointError, match="hidden_act"):
        configs.text_encoder_from_transformers(
            {
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "intermediate_size": 8,
                "hidden_act": "relu",
            }
        )
