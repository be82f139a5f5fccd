"""The tiny VAE decoder (TAESD, opt-in): same outputs as diffusers' AutoencoderTiny on the same weights, loads
its folders and the original TAESD decoder file, and decodes generated images when set on a model."""

import json

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

import sdlab
from sdlab.checkpoints.atomic import DestinationExistsError
from sdlab.errors import CheckpointError
from sdlab.model import Model
from sdlab.nn.tiny_vae import (
    TinyDecoder,
    TinyDecoderConfig,
    load_tiny_decoder,
    save_tiny_decoder,
)
from sdlab.params import GenerationParams

SMALL = dict(decoder_block_out_channels=(16, 16, 16), num_decoder_blocks=(2, 1, 1),
             encoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 1, 1))


def reference(**config) -> AutoencoderTiny:
    vae = AutoencoderTiny(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.1)
    return vae


@pytest.mark.parametrize("config", [{}, SMALL], ids=["taesd", "small"])
@torch.no_grad()
def test_decodes_like_diffusers_from_a_diffusers_folder(tmp_path, config):
    vae = reference(**config)
    vae.save_pretrained(tmp_path)
    decoder = load_tiny_decoder(tmp_path)
    latents = torch.randn(2, 4, 6, 5) * 2
    expected = vae.decode(latents).sample
    torch.testing.assert_close(decoder(latents), expected, rtol=1e-5, atol=1e-5)
    assert decoder(latents).shape == (2, 3, 6 * decoder.cfg.upscale, 5 * decoder.cfg.upscale)


@torch.no_grad()
def test_loads_the_original_taesd_decoder_file(tmp_path):
    """madebyollin/taesd's taesd_decoder.safetensors: keys of nn.Sequential(Clamp(), conv, ...), one index on."""
    vae = reference()
    original = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v
                for k, v in vae.decoder.state_dict().items()}
    save_file(original, tmp_path / "taesd_decoder.safetensors")
    latents = torch.randn(1, 4, 4, 4)
    decoder = load_tiny_decoder(tmp_path / "taesd_decoder.safetensors")
    torch.testing.assert_close(decoder(latents), vae.decode(latents).sample, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_saved_folder_loads_back_with_its_config_and_is_never_overwritten_silently(tmp_path):
    decoder = TinyDecoder(TinyDecoderConfig(channels=(8, 8, 8), blocks=(2, 2, 1))).eval()
    save_tiny_decoder(decoder, tmp_path / "tiny", dtype=torch.float32)
    back = load_tiny_decoder(tmp_path / "tiny")
    assert back.cfg == decoder.cfg
    latents = torch.randn(1, 4, 5, 3)
    torch.testing.assert_close(back(latents), decoder(latents), rtol=0, atol=0)
    with pytest.raises(DestinationExistsError, match="already exists"):
        save_tiny_decoder(decoder, tmp_path / "tiny")


def test_bad_files_get_clear_errors(tmp_path):
    save_file({"encoder.layers.0.weight": torch.zeros(1)}, tmp_path / "encoder_only.safetensors")
    with pytest.raises(CheckpointError, match="no tiny VAE decoder weights"):
        load_tiny_decoder(tmp_path / "encoder_only.safetensors")
    wrong = {f"decoder.{k}": v for k, v in TinyDecoder(TinyDecoderConfig(channels=(8, 8))).state_dict().items()}
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="not a tiny VAE decoder"):
        load_tiny_decoder(tmp_path / "wrong.safetensors")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(CheckpointError, match="no AutoencoderTiny weights"):
        load_tiny_decoder(tmp_path / "folder")


def test_generation_uses_the_tiny_decoder_when_set():
    model = Model.from_name("random:tiny")
    params = GenerationParams(prompt="a cat", steps=2, seed=1)
    full = sdlab.generate(model, params)
    model.tiny_decoder = TinyDecoder(TinyDecoderConfig(channels=(16,) * 4, blocks=(1, 1, 1, 1)))
    decoded = []
    model.tiny_decoder.register_forward_hook(lambda m, args, out: decoded.append(args[0]))
    tiny = sdlab.generate(model, params)
    assert len(decoded) == 1
    torch.testing.assert_close(decoded[0], full.latents)  # the UNet's latents, unscaled
    h, w = full.latents.shape[-2:]
    assert tiny.images[0].size == (w * 8, h * 8)  # the tiny decoder's own upscale (this one: 3 levels of 2x)
