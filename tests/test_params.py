"""Bad generation requests fail with a clear ParameterError before any model work."""

import dataclasses

import pytest
import torch
from PIL import Image

import sdlab
from sdlab.config import TINY
from sdlab.errors import ParameterError
from sdlab.generation import NumericalError
from sdlab.params import GenerationParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdlab.Model.build(TINY)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=100), "width=100 is not a multiple of 8"),
        (dict(height=36), "height=36 is not a multiple of 8"),
        (dict(width=0), "width must be an integer from 8"),
        (dict(steps=0), "steps must be an integer from 1"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(strength=1.5, init_image=Image.new("RGB", (64, 64))), "strength must be a number from 0.0 to 1.0"),
        (dict(strength=-0.1, init_image=Image.new("RGB", (64, 64))), "strength must be a number from 0.0 to 1.0"),
        (dict(cfg_scale=-1.0), "cfg_scale must be a number from 0.0"),
        (dict(batch_size=0), "batch_size must be an integer from 1"),
        (dict(clip_skip=9), "clip_skip must be an integer from 1 to 3"),
        (dict(sampler="Euler b"), "unknown sampler 'Euler b'; valid samplers: 'Euler' (euler), 'Euler a'"),
        (dict(schedule="fancy"), "unknown schedule 'fancy'; valid: automatic, normal, karras"),
        (dict(mask=Image.new("L", (64, 64))), "a mask needs an init_image"),
        (dict(init_image=Image.new("RGB", (64, 64)), mask=Image.new("L", (32, 64))),
         "the mask is 32x64 but the image is 64x64"),
    ],
)
def test_bad_parameters_are_rejected_before_model_work(model, changes, message):
    calls = []
    model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ParameterError) as error:
        sdlab.generate(model, GenerationParams(prompt="a red circle", **changes))
    assert message in str(error.value)
    assert calls == []


def test_init_image_size_rounds_down_to_multiple_of_8(model):
    params = GenerationParams(prompt="x", init_image=Image.new("RGB", (70, 45))).resolved(model.config)
    assert (params.width, params.height) == (64, 40)


def test_inpainting_model_needs_an_image():
    config = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, in_channels=9))
    with pytest.raises(ParameterError, match="inpainting model"):
        GenerationParams(prompt="x").validate(config)


def test_nan_in_latents_names_the_stage(model):
    broken = sdlab.Model.build(TINY)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"step 1 of 3 \(sampler Euler\)"):
        sdlab.generate(broken, GenerationParams(prompt="x", steps=3, sampler="Euler", seed=0))


def test_resolved_fills_size_and_seed(model):
    params = GenerationParams(prompt="x").resolved(model.config)
    assert (params.width, params.height) == (64, 64) and isinstance(params.seed, int)
    assert params.replace(batch_size=3).seeds == [params.seed, params.seed + 1, params.seed + 2]


def test_default_schedule_is_karras_except_for_zero_terminal_snr_models():
    zero_snr = dataclasses.replace(TINY, schedule=dataclasses.replace(TINY.schedule, zero_terminal_snr=True))
    assert GenerationParams().resolved(TINY).schedule == "karras"
    assert GenerationParams().resolved(zero_snr).schedule == "automatic"  # Karras would start at sigma 4096
    assert GenerationParams(schedule="karras").resolved(zero_snr).schedule == "karras"  # a choice is kept


def test_default_guidance_is_the_models():
    assert GenerationParams().cfg_scale is None
    assert GenerationParams().resolved(TINY).cfg_scale == 7.0  # SD's usual
    assert GenerationParams().resolved(TINY.replace(default_guidance=3.0)).cfg_scale == 3.0
    assert GenerationParams(cfg_scale=1.0).resolved(TINY.replace(default_guidance=3.0)).cfg_scale == 1.0  # kept
    with pytest.raises(ParameterError, match="cfg_scale"):
        GenerationParams(cfg_scale=-1.0).resolved(TINY)
