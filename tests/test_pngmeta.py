"""A1111 `parameters` chunk: writing from GenerationParams, parsing back, and reading A1111's own text."""

import io

import pytest
from PIL import Image

from sdlab.errors import ParameterError
from sdlab.params import GenerationParams
from sdlab.pngmeta import (
    ModelInfo,
    infotext,
    params_from_infotext,
    parse_infotext,
    png_bytes,
    read_infotext,
    split_sampler,
)

MODEL = ModelInfo("v1-5-pruned-emaonly", "6ce0161689")


def test_infotext_has_a1111_layout():
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=20, sampler="Euler a",
                              schedule="karras", cfg_scale=7.0, seed=42, width=512, height=768)
    text = infotext(params, MODEL)
    assert text.split("\n") == [
        "a red circle",
        "Negative prompt: blurry",
        ("Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: sdlab 0.1.0"),
    ]


def test_round_trip_keeps_every_generation_field():
    params = GenerationParams(prompt="a blue star,\nbelow a square: big", negative_prompt="ugly\nnoisy",
                              steps=7, sampler="DPM++ SDE", schedule="sgm_uniform", cfg_scale=4.5,
                              guidance_rescale=0.7, seed=2**40 + 3, width=64, height=128, clip_skip=2, eta=0.3,
                              token_merging=0.4, deepcache=3)
    back = params_from_infotext(infotext(params, MODEL))
    assert back == params


def test_batch_image_carries_its_own_seed():
    params = GenerationParams(prompt="p", seed=10, batch_size=4, width=64, height=64)
    text = infotext(params, MODEL, index=3)
    fields = parse_infotext(text).fields
    assert fields["Seed"] == "13" and fields["Batch size"] == "4" and fields["Batch pos"] == "3"
    assert params_from_infotext(text).batch_size == 1  # re-creating it alone


def test_values_with_commas_and_colons_are_quoted():
    model = ModelInfo("random:tiny", "abc")
    text = infotext(GenerationParams(prompt="x", seed=1, width=8, height=8), model)
    assert 'Model: "random:tiny"' in text
    assert parse_infotext(text).fields["Model"] == "random:tiny"


def test_img2img_records_denoising_strength():
    init = Image.new("RGB", (64, 64))
    params = GenerationParams(prompt="x", seed=1, width=64, height=64, init_image=init, strength=0.4)
    fields = parse_infotext(infotext(params, MODEL)).fields
    assert fields["Denoising strength"] == "0.4"


def test_reads_text_written_by_a1111():
    # As AUTOMATIC1111 v1.6 writes it: schedule folded into the sampler name, extra fields we ignore.
    text = ("masterpiece, a castle\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x640, "
            'Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.5, Lora hashes: "a: 1, b: 2", '
            "Version: v1.6.0")
    info = parse_infotext(text)
    assert info.prompt == "masterpiece, a castle" and info.negative_prompt == "lowres, bad anatomy"
    assert info.fields["Lora hashes"] == "a: 1, b: 2"
    params = info.to_params()
    assert (params.sampler, params.schedule, params.steps, params.cfg_scale) == ("DPM++ 2M", "karras", 28, 6.5)
    assert (params.seed, params.width, params.height, params.strength) == (1234, 512, 640, 0.5)


def test_a_prompt_without_parameters_line():
    info = parse_infotext("just a prompt, with a comma")
    assert info.prompt == "just a prompt, with a comma" and info.fields == {}


def test_missing_schedule_type_means_automatic():
    text = "p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    assert params_from_infotext(text).schedule == "automatic"


def test_split_sampler():
    assert split_sampler("DPM++ 2M SDE Exponential", None, "karras") == ("DPM++ 2M SDE", "exponential")
    assert split_sampler("Euler", "SGM Uniform", "karras") == ("Euler", "sgm_uniform")
    assert split_sampler("Euler", None, "karras") == ("Euler", "karras")


def test_bad_numbers_raise_parameter_error():
    with pytest.raises(ParameterError, match="Steps"):
        params_from_infotext("p\nSteps: many, Sampler: Euler, Seed: 1, Size: 64x64")
    with pytest.raises(ParameterError, match="Size"):
        params_from_infotext("p\nSteps: 3, Sampler: Euler, Seed: 1, Size: big")


def test_png_chunk_round_trip_with_unicode():
    text = infotext(GenerationParams(prompt="ein Kreis über einem Quadrat ✓", seed=1, width=8, height=8), MODEL)
    data = png_bytes(Image.new("RGB", (8, 8), "red"), text)
    assert read_infotext(data) == text
    assert read_infotext(Image.open(io.BytesIO(data))) == text
    assert read_infotext(png_bytes(Image.new("RGB", (8, 8)))) is None
