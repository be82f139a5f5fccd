"""SDXL's second prompt (`prompt_2` / `negative_prompt_2`, diffusers' names): CLIP ViT-L encodes the prompt,
OpenCLIP bigG the second prompt, and the pooled vector is bigG's. Checked against diffusers'
StableDiffusionXLPipeline on the tiny random SDXL folders of tests/test_sdxl_pipelines.py (<= 2/255), including
diffusers' rules for a second prompt left out or empty and for a negative prompt left out (zeros, whatever
negative_prompt_2 says); the conditioner feeds each encoder its own texts (the refiner's bigG the second); the
PNG infotext keeps them under sdlab's own keys and `--from-png` reads them back; a model with one text
encoder refuses a second prompt that differs from the first.
"""

import numpy as np
import pytest
import torch

import sdlab
from sdlab import families
from sdlab.cli import main
from sdlab.errors import ParameterError
from sdlab.families.sd1 import TINY
from sdlab.params import GenerationParams
from sdlab.pngmeta import infotext, params_from_infotext, parse_infotext, read_infotext
from test_sdxl_pipelines import CFG, PROMPT, STEPS, _image, _max_diff, _pair, _run, base_folder, refiner_folder  # noqa: F401

PROMPT_2 = "a green triangle in the snow, oil painting"
NEGATIVE, NEGATIVE_2 = "dark", "blurry, low quality"

CALLS = {
    "prompt_2": {"prompt_2": PROMPT_2},
    "both negatives": {"prompt_2": PROMPT_2, "negative_prompt": NEGATIVE, "negative_prompt_2": NEGATIVE_2},
    "negative_prompt_2 alone": {"negative_prompt": NEGATIVE, "negative_prompt_2": NEGATIVE_2},
    "empty prompt_2 is the prompt": {"prompt_2": "", "negative_prompt": "", "negative_prompt_2": NEGATIVE_2},
    # diffusers zeroes a negative prompt left out (force_zeros_for_empty_prompt) and ignores negative_prompt_2
    "negative_prompt_2 without negative_prompt": {"prompt_2": PROMPT_2, "negative_prompt_2": NEGATIVE_2},
    "lists and batch": {"prompt": [PROMPT, "a yellow star"], "prompt_2": [PROMPT_2, "a purple moon"],
                        "negative_prompt": [NEGATIVE, ""], "negative_prompt_2": [NEGATIVE_2, "noisy"],
                        "num_images_per_prompt": 2},
}  # fmt: skip


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_txt2img_with_second_prompts_equals_diffusers(base_folder, call):
    theirs, ours = _pair("StableDiffusionXLPipeline", base_folder)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": CFG, "height": 64, "width": 64, **CALLS[call]}
    prompt = kwargs.pop("prompt", PROMPT)
    a, b = _run(theirs, prompt, **kwargs), _run(ours, prompt, **kwargs)
    assert len(a) == len(b) and _max_diff(a, b) <= 2


def test_the_second_prompts_change_the_image(base_folder):
    """The parity above means something: each second text moves the image (by more than the tolerance)."""
    _, ours = _pair("StableDiffusionXLPipeline", base_folder)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": CFG, "negative_prompt": NEGATIVE}
    one = _run(ours, PROMPT, **kwargs)
    assert _max_diff(one, _run(ours, PROMPT, prompt_2=PROMPT_2, **kwargs)) > 2
    assert _max_diff(one, _run(ours, PROMPT, negative_prompt_2=NEGATIVE_2, **kwargs)) > 2


def test_img2img_second_prompts_equal_diffusers(base_folder, refiner_folder):
    """The base's img2img pipeline uses both; the refiner's (bigG only) encodes `prompt`, as diffusers does
    (it zips [prompt, prompt_2] with the one encoder it has)."""
    kwargs = {"image": _image(), "num_inference_steps": STEPS, "guidance_scale": CFG, "strength": 0.6,
              "prompt_2": PROMPT_2, "negative_prompt": NEGATIVE, "negative_prompt_2": NEGATIVE_2}
    for folder in (base_folder, refiner_folder):
        theirs, ours = _pair("StableDiffusionXLImg2ImgPipeline", folder)
        assert _max_diff(_run(theirs, PROMPT, **kwargs), _run(ours, PROMPT, **kwargs)) <= 2


def _condition(model, prompts, negatives, **texts):
    params = GenerationParams(width=64, height=64).resolved(model.config)
    return families.family_of(model.config).condition(model, prompts, negatives, params, **texts)


def test_each_encoder_encodes_its_own_texts(base_folder, refiner_folder):
    """The context is [CLIP ViT-L(prompt), bigG(prompt_2)] along features, the pooled vector bigG(prompt_2);
    A1111's syntax applies to each (here a weight and a prompt over 75 tokens in the second only)."""
    base = sdlab.Model.load(base_folder)
    width_l = base.config.text_encoder.width
    second = "(a green triangle:1.3), " + "snow " * 90  # two 75-token chunks
    cond, uncond = _condition(base, [PROMPT], [NEGATIVE], prompts_2=[second], negatives_2=[NEGATIVE_2])
    first_only, first_uncond = _condition(base, [PROMPT], [NEGATIVE])
    second_only, second_uncond = _condition(base, [second], [NEGATIVE_2])
    assert cond.context.shape[1] == 2 * 77  # the first encoder padded to the second's chunks
    torch.testing.assert_close(cond.context[:, :77, :width_l], first_only.context[:, :, :width_l])
    torch.testing.assert_close(cond.context[..., width_l:], second_only.context[..., width_l:])
    torch.testing.assert_close(cond.added, second_only.added)  # bigG's pooled vector + the same time ids
    torch.testing.assert_close(uncond.context[:, :77, :width_l], first_uncond.context[:, :77, :width_l])
    torch.testing.assert_close(uncond.added, second_uncond.added)
    # An empty negative conditions on zeros only when it is empty for both encoders.
    _, zeros = _condition(base, [PROMPT], [""])
    _, half = _condition(base, [PROMPT], [""], negatives_2=[NEGATIVE_2])
    assert not zeros.context.any() and half.context[..., width_l:].abs().sum() > 0

    refiner = sdlab.Model.load(refiner_folder)  # bigG only: it encodes the second prompts
    cond, _ = _condition(refiner, [PROMPT], None, prompts_2=[PROMPT_2])
    alone, _ = _condition(refiner, [PROMPT_2], None)
    torch.testing.assert_close(cond.context, alone.context)
    torch.testing.assert_close(cond.added, alone.added)


def test_generate_takes_the_second_prompts(base_folder, refiner_folder):
    """`GenerationParams.prompt_2` reaches the conditioner through `generate` (with a refiner too)."""
    base, refiner = sdlab.Model.load(base_folder), sdlab.Model.load(refiner_folder)
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler",
                              cfg_scale=CFG, seed=1, width=64, height=64)
    one = sdlab.generate(base, params).images
    assert _max_diff(one, sdlab.generate(base, params.replace(prompt_2=PROMPT)).images) == 0
    assert _max_diff(one, sdlab.generate(base, params.replace(prompt_2=PROMPT_2)).images) > 2
    theirs, _ = _pair("StableDiffusionXLPipeline", base_folder)
    both = params.replace(prompt_2=PROMPT_2, negative_prompt_2=NEGATIVE_2, sampler="Euler")
    reference = _run(theirs, PROMPT, prompt_2=PROMPT_2, negative_prompt=NEGATIVE, negative_prompt_2=NEGATIVE_2,
                     num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64)
    assert _max_diff(sdlab.generate(base, both).images, reference) <= 2
    refined = sdlab.generate(base, both.replace(refiner_switch_at=0.5), refiner=refiner).images
    assert _max_diff(refined, sdlab.generate(base, both.replace(refiner_switch_at=0.5, prompt_2=None),
                                             refiner=refiner).images) > 0


def test_a_model_with_one_text_encoder_refuses_a_different_second_prompt():
    model = sdlab.Model.build(TINY)
    params = GenerationParams(prompt="a red circle", negative_prompt="dark", steps=1, seed=0)
    for field, text in (("prompt_2", "a blue square"), ("negative_prompt_2", "blurry")):
        with pytest.raises(ParameterError, match=f"{field}=.*one text encoder"):
            params.replace(**{field: text}).resolved(model.config)
    with pytest.raises(ParameterError, match="prompt_2 must be a string"):
        params.replace(prompt_2=3).resolved(model.config)
    # The same text (or None) is the one prompt; lists through the conditioner are checked per image too.
    same = params.replace(prompt_2="a red circle", negative_prompt_2="dark")
    assert len(sdlab.generate(model, same).images) == 1
    with pytest.raises(ParameterError, match="prompt_2=.*one text encoder"):
        _condition(model, ["a", "b"], None, prompts_2=["a", "c"])


def test_infotext_round_trip():
    params = GenerationParams(prompt="a cat", negative_prompt="dark", prompt_2='a "cat", oil: on canvas\nsoft',
                              negative_prompt_2="blurry", steps=3, seed=5, width=64, height=64, cfg_scale=5,
                              schedule="karras")
    text = infotext(params)
    fields = parse_infotext(text).fields
    assert fields["Prompt 2"] == params.prompt_2 and fields["Negative prompt 2"] == "blurry"
    back = params_from_infotext(text)
    assert (back.prompt_2, back.negative_prompt_2, back.prompt, back.negative_prompt) == (
        params.prompt_2, "blurry", "a cat", "dark")
    plain = infotext(params.replace(prompt_2=None, negative_prompt_2=None))
    assert "Prompt 2" not in plain and "prompt 2" not in plain.lower()
    assert params_from_infotext(plain).prompt_2 is None


def test_cli_flags_and_from_png(base_folder, tmp_path, capsys):
    common = ["--model", base_folder, "--size", "64x64", "--steps", "2", "--seed", "3", "-q"]
    assert main([str(a) for a in ["generate", PROMPT, "--prompt-2", PROMPT_2, "--negative", NEGATIVE,
                                  "--negative-prompt-2", NEGATIVE_2, *common, "--out", tmp_path / "a"]]) == 0
    (first,) = capsys.readouterr().out.split()
    params = params_from_infotext(read_infotext(first))
    assert (params.prompt_2, params.negative_prompt_2) == (PROMPT_2, NEGATIVE_2)
    assert main([str(a) for a in ["generate", "--from-png", first, "--model", base_folder, "-q",
                                  "--out", tmp_path / "b"]]) == 0
    (again,) = capsys.readouterr().out.split()
    assert _max_diff([_pixels(first)], [_pixels(again)]) == 0
    assert main([str(a) for a in ["generate", PROMPT, "--negative", NEGATIVE, *common,
                                  "--out", tmp_path / "c"]]) == 0
    (one,) = capsys.readouterr().out.split()
    assert "Prompt 2" not in read_infotext(one) and _max_diff([_pixels(first)], [_pixels(one)]) > 0


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
