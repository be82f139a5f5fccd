"""Parity of sdlab's VAE with diffusers' AutoencoderKL (the reference), on tiny configs.

The diffusers model gets random weights (norm scales and biases included), its state_dict is loaded into
sdlab's VAE with strict=True, and encode/decode are compared in fp32 on CPU.
"""

import dataclasses
import math

import pytest
import torch
from diffusers import AutoencoderKL

from sdlab.config import SD15, TINY, VAEConfig
from sdlab.errors import ParameterError
from sdlab.nn.vae import VAE

TOL = 1e-4

THREE_LEVELS = VAEConfig(channels=(16, 32, 32), layers_per_block=2, norm_groups=8)
WIDE_LATENT = VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8, latent_channels=16, out_channels=4)
CONFIGS = {"tiny": TINY.vae, "three_levels": THREE_LEVELS, "wide_latent": WIDE_LATENT}


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKL:
    levels = len(cfg.channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    )


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights at a scale that keeps activations O(1); norm scales around 1, small random biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # GroupNorm scale
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return model.eval()


def make_pair(cfg: VAEConfig, random_weights: bool = True) -> tuple[AutoencoderKL, VAE]:
    ref = diffusers_vae(cfg)
    if random_weights:
        randomize_(ref)
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, relative to the output's scale when that exceeds 1."""
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_diffusers(name):
    cfg = CONFIGS[name]
    theirs = {k: v.shape for k, v in diffusers_vae(cfg).state_dict().items()}
    ours = {k: v.shape for k, v in VAE(cfg).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(32, 32), (16, 40)])
def test_encode_matches_diffusers(name, size):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    x = torch.rand(2, cfg.in_channels, *size) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
    f = cfg.downscale
    assert mean.shape == logvar.shape == (2, cfg.latent_channels, size[0] // f, size[1] // f)
    assert dist.mean.abs().max() > 0.1
    assert max_rel_diff(mean, dist.mean) <= TOL
    assert max_rel_diff(logvar, dist.logvar) <= TOL


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
def test_decode_matches_diffusers(name, size):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    z = torch.randn(2, cfg.latent_channels, *size)
    with torch.no_grad():
        image = ours.decode(z)
        expected = ref.decode(z).sample
    f = cfg.downscale
    assert image.shape == (2, cfg.out_channels, size[0] * f, size[1] * f)
    assert expected.abs().max() > 0.1
    assert max_rel_diff(image, expected) <= TOL


def test_logvar_is_clamped_like_the_reference():
    ref, ours = make_pair(TINY.vae)
    latent = TINY.vae.latent_channels
    with torch.no_grad():
        for model in (ref, ours):  # push half the log-variances far above 20, half far below -30
            model.quant_conv.bias[latent:] = torch.tensor([100.0, -100.0, 100.0, -100.0])
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, logvar = ours.encode(x)
        expected = ref.encode(x).latent_dist.logvar
    assert logvar.max() == 20.0 and logvar.min() == -30.0
    assert torch.equal(logvar, expected)


def test_sample_latent_matches_reference_draw():
    ref, ours = make_pair(TINY.vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        z = ours.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(7))
        expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(z, mean)
    assert max_rel_diff(z, expected) <= TOL


def test_round_trip_of_default_initialisation_matches():
    """diffusers' own initial weights (no re-randomisation) through encode then decode."""
    ref, ours = make_pair(THREE_LEVELS, random_weights=False)
    x = torch.rand(1, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        image = ours.decode(ours.encode(x)[0])
        expected = ref.decode(ref.encode(x).latent_dist.mean).sample
    assert image.shape == x.shape
    assert max_rel_diff(image, expected) <= TOL


def test_gradients_flow_to_every_parameter():
    _, ours = make_pair(TINY.vae)
    ours.train()
    mean, logvar = ours.encode(torch.rand(1, 3, 16, 16))
    (ours.decode(mean).square().mean() + logvar.mean()).backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    "method, shape, match",
    [
        ("encode", (1, 4, 16, 16), "in_channels"),
        ("encode", (1, 3, 16, 17), "multiples of 2"),
        ("encode", (3, 16, 16), "in_channels"),
        ("decode", (1, 3, 4, 4), "latent_channels"),
    ],
)
def test_bad_inputs_raise_parameter_error(method, shape, match):
    ours = VAE(TINY.vae)
    with pytest.raises(ParameterError, match=match):
        getattr(ours, method)(torch.randn(shape))


def test_bad_config_raises_parameter_error():
    with pytest.raises(ParameterError, match="norm_groups"):
        VAE(dataclasses.replace(TINY.vae, channels=(32, 60)))


@pytest.mark.slow
def test_full_size_sd15_vae_matches_diffusers():
    ref, ours = make_pair(SD15.vae, random_weights=False)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        image = ours.decode(mean)
        expected = ref.decode(dist.mean).sample
    diffs = {
        "mean": max_rel_diff(mean, dist.mean),
        "logvar": max_rel_diff(logvar, dist.logvar),
        "decode": max_rel_diff(image, expected),
    }
    print(f"SD 1.5 VAE max diffs vs diffusers: {diffs}")
    assert max(diffs.values()) <= TOL


def test_channels_last_gives_the_same_output():
    _, ours = make_pair(TINY.vae)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, _ = ours.encode(x)
        expected = ours.decode(mean)
        ours = ours.to(memory_format=torch.channels_last)
        mean_cl, _ = ours.encode(x.to(memory_format=torch.channels_last))
        out = ours.decode(mean_cl.contiguous(memory_format=torch.channels_last))
    assert (mean_cl - mean).abs().max() <= 1e-5
    assert (out - expected).abs().max() <= 1e-5
