"""Key mapping between the original single-file layout and the diffusers layout (sdlab.checkpoints.convert).

Checked three ways: round trips on the meta device for the full-size presets (every key mapped, shapes kept,
nothing lost); diffusers' own converters (`diffusers.loaders.single_file_utils`, an independent reading of the
original layout) turning sdlab's export back into exactly the diffusers state dict it came from; and the
conversion being zero-copy.
"""

import pytest
import torch
from diffusers.loaders import single_file_utils as reference
from test_checkpoints_support import TINY_CONFIGS, assert_same_state_dict, reference_networks, reference_state_dicts

from sdlab.checkpoints import configs, diffusers_to_ldm, ldm_to_diffusers
from sdlab.config import PRESETS, SD15, SD21
from sdlab.errors import CheckpointError

FULL_SIZE = ["sd15", "sd15-inpaint", "sd21-base", "sd21", "sd2-inpaint"]
ROOTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@pytest.fixture(scope="module")
def meta_state_dicts():
    return {name: reference_state_dicts(PRESETS[name], device="meta") for name in FULL_SIZE}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_round_trip_on_meta(name, meta_state_dicts):
    config, states = PRESETS[name], meta_state_dicts[name]
    ldm = diffusers_to_ldm(states, config)
    assert all(k.startswith(ROOTS) for k in ldm)
    fused = 4 * config.text_encoder.num_layers if config.text_encoder.activation == "gelu" else 0
    assert len(ldm) == sum(len(sd) for sd in states.values()) - fused  # 1:1 except OpenCLIP's q/k/v (3 -> 1)
    back = ldm_to_diffusers(ldm, config)
    for component, sd in states.items():
        assert_same_state_dict(back[component], sd, values=False)


def test_sd15_original_names_and_shapes(meta_state_dicts):
    ldm = diffusers_to_ldm(meta_state_dicts["sd15"], SD15)
    unet = [k for k in ldm if k.startswith("model.diffusion_model.")]
    vae = [k for k in ldm if k.startswith("first_stage_model.")]
    assert (len(unet), len(vae)) == (686, 248)  # the counts of the released v1-5 checkpoint
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (320 * 4, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }
    for key, shape in expected.items():
        assert tuple(ldm[key].shape) == shape, key


def test_sd21_openclip_names_and_shapes(meta_state_dicts):
    ldm = diffusers_to_ldm(meta_state_dicts["sd21"], SD21)
    text = [k for k in ldm if k.startswith("cond_stage_model.")]
    assert len(text) == 23 * 12 + 4  # 23 resblocks of 12 tensors, token + positional embedding, ln_final
    assert tuple(ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(ldm["cond_stage_model.model.positional_embedding"].shape) == (77, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" not in ldm
    assert tuple(ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320)  # Linear


# --- diffusers' converters as the independent reference -------------------------------------------------


def _reference_convert(ldm: dict, config) -> dict:
    """diffusers' own original -> diffusers conversion of each network (installed diffusers 0.42)."""
    unet = reference.convert_ldm_unet_checkpoint(ldm, configs.unet_to_diffusers(config.unet, 8))
    vae = reference.convert_ldm_vae_checkpoint(ldm, configs.vae_to_diffusers(config.vae, 64))
    if config.text_encoder.activation == "gelu":
        # It reads the width for the q/k/v split from the model's config (our files carry no text_projection).
        text_model = reference_networks(config, device="meta")["text_encoder"]
        text = reference.convert_open_clip_checkpoint(text_model, ldm)
    else:
        text = reference.convert_ldm_clip_checkpoint(ldm)
    return {"unet": unet, "vae": vae, "text_encoder": text}


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_diffusers_converters_invert_our_export_exactly(config):
    states = reference_state_dicts(config)
    ldm = diffusers_to_ldm(states, config)
    converted = _reference_convert(ldm, config)
    for component, sd in states.items():
        assert_same_state_dict(converted[component], sd)  # same keys, shapes, dtypes and values
    assert_same_state_dict(
        {k: v for c in ldm_to_diffusers(ldm, config).values() for k, v in c.items()},
        {k: v for c in states.values() for k, v in c.items()},
    )


@pytest.mark.parametrize("name", FULL_SIZE)
def test_diffusers_converters_agree_on_full_size_layouts(name, meta_state_dicts):
    # Full configs on the meta device: diffusers' converters hard-code SD-sized details (e.g. which keys
    # infer_diffusers_model_type inspects), so the family check needs the real sizes.
    config, states = PRESETS[name], meta_state_dicts[name]
    ldm = diffusers_to_ldm(states, config)
    family = {
        "sd15": "v1",
        "sd15-inpaint": "inpainting",
        "sd21-base": "v2",
        "sd21": "v2",
        "sd2-inpaint": "inpainting_v2",
    }
    assert reference.infer_diffusers_model_type(ldm) == family[name]
    converted = _reference_convert(ldm, config)
    for component, sd in states.items():
        assert_same_state_dict(converted[component], sd, values=False)


# --- zero copy, strictness, tolerated extras -------------------------------------------------------------


def test_conversion_does_not_copy_tensors():
    config = TINY_CONFIGS[1]  # SD2-like: exercises the q/k/v split and the VAE 1x1 convs
    ldm = diffusers_to_ldm(reference_state_dicts(config), config)
    storages = {v.untyped_storage().data_ptr() for v in ldm.values()}
    for sd in ldm_to_diffusers(ldm, config).values():
        for key, value in sd.items():
            assert value.untyped_storage().data_ptr() in storages, f"{key} was copied"


def test_vae_attention_is_reshaped_between_conv_and_linear():
    config = TINY_CONFIGS[0]
    states = reference_state_dicts(config)
    ldm = diffusers_to_ldm(states, config)
    conv = ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"]
    linear = states["vae"]["decoder.mid_block.attentions.0.to_out.0.weight"]
    assert conv.shape == (*linear.shape, 1, 1) and torch.equal(conv[:, :, 0, 0], linear)


def test_openclip_qkv_are_fused_in_order():
    config = TINY_CONFIGS[1]
    states = reference_state_dicts(config)
    fused = diffusers_to_ldm(states, config)["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "text_model.encoder.layers.1.self_attn."
    parts = [states["text_encoder"][layer + p + "_proj.weight"] for p in "qkv"]
    assert torch.equal(fused, torch.cat(parts))


def test_unexpected_key_in_a_network_is_reported():
    config = TINY_CONFIGS[0]
    ldm = diffusers_to_ldm(reference_state_dicts(config), config)
    ldm["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unet.*unexpected.*input_blocks\.99"):
        ldm_to_diffusers(ldm, config)


def test_missing_weights_are_reported():
    config = TINY_CONFIGS[0]
    ldm = diffusers_to_ldm(reference_state_dicts(config), config)
    del ldm["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    del ldm["first_stage_model.decoder.up.0.block.1.conv2.bias"]
    with pytest.raises(CheckpointError, match=r"vae.*absent.*decoder\.up\.0\.block\.1\.conv2"):
        ldm_to_diffusers(ldm, config)
    states = reference_state_dicts(config)
    del states["unet"]["conv_out.weight"], states["unet"]["conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"unet.*absent.*conv_out"):
        diffusers_to_ldm(states, config)


def test_extras_of_released_files_are_ignored():
    """What real SD files carry beside the weights sdlab uses: EMA copies, schedule buffers, the text
    encoder's position_ids, OpenCLIP's last layer, projection and temperature."""
    config = TINY_CONFIGS[1]
    states = reference_state_dicts(config)
    ldm = diffusers_to_ldm(states, config)
    n = config.text_encoder.num_layers
    extra_layer = {
        k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): v for k, v in ldm.items() if f"resblocks.{n - 1}." in k
    }
    ldm.update(extra_layer)
    ldm.update(
        {
            "cond_stage_model.model.text_projection": torch.zeros(32, 32),
            "cond_stage_model.model.logit_scale": torch.zeros(()),
            "model_ema.decay": torch.zeros(()),
            "model_ema.diffusion_modelconv_inweight": torch.zeros(1),
            "alphas_cumprod": torch.zeros(1000),
            "betas": torch.zeros(1000),
        }
    )
    back = ldm_to_diffusers(ldm, config)
    for component, sd in states.items():
        assert_same_state_dict(back[component], sd)


def test_legacy_and_transformers5_text_encoder_names():
    config = TINY_CONFIGS[0]
    states = reference_state_dicts(config)
    ldm = diffusers_to_ldm(states, config)
    # Old transformers versions: no `text_model.` level, plus the position_ids buffer.
    legacy = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in ldm.items()
    }
    legacy["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    assert_same_state_dict(ldm_to_diffusers(legacy, config)["text_encoder"], states["text_encoder"])
    # transformers >= 5 writes CLIPTextModel keys without `text_model.`.
    flat = {**states, "text_encoder": {k.removeprefix("text_model."): v for k, v in states["text_encoder"].items()}}
    assert_same_state_dict(diffusers_to_ldm(flat, config), ldm)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_sdlab_networks_load_the_converted_weights_strictly(config):
    """sdlab's networks use the diffusers names: what the converters produce loads with strict=True."""
    networks = {
        "unet": pytest.importorskip("sdlab.nn.unet").UNet(config.unet),
        "vae": pytest.importorskip("sdlab.nn.vae").VAE(config.vae),
        "text_encoder": pytest.importorskip("sdlab.nn.clip").TextEncoder(config.text_encoder),
    }
    states = reference_state_dicts(config)
    converted = ldm_to_diffusers(diffusers_to_ldm(states, config), config)
    for name, net in networks.items():
        net.load_state_dict(converted[name], strict=True)
        assert_same_state_dict(dict(net.state_dict()), states[name])
