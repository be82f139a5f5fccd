"""End-to-end parity: sdlab's images equal diffusers' pipelines' on the same random-weight model and seed.

A tiny SD-structured model (sdlab.config.TINY) is saved as a diffusers folder; diffusers'
StableDiffusion(Img2Img|Inpaint)Pipeline and sdlab load it, and each sampler that diffusers implements
must give the same 8-bit image (max difference <= 2/255), square and non-square, single generator and
per-image generator lists.
"""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.config import TINY
from sdlab.generation import sample_batch

# sdlab sampler label -> (diffusers scheduler class, options), as in sdlab.diffusion.registry.
PAIRS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "DDPM": ("DDPMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
SCHEDULE_OPTIONS = {"automatic": {}, "karras": {"use_karras_sigmas": True}}
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"
CFG = 3.0  # moderate guidance keeps a random model's latents in a range where pixels are not all clipped


def _save(tmp_path_factory, config, name):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name) / "model"
    sdlab.Model.build(config).save(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save(tmp_path_factory, TINY, "tiny")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    config = dataclasses.replace(TINY, name="tiny-inpaint", unet=dataclasses.replace(TINY.unet, in_channels=9))
    return _save(tmp_path_factory, config, "tiny_inpaint")


def _reference(cls, folder, sampler, schedule="automatic"):
    pipe = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    scheduler, options = PAIRS[sampler]
    # sdlab uses the model's own spacing ("leading", steps_offset 1, as SD ships) for every sampler.
    pipe.scheduler = getattr(diffusers, scheduler).from_config(
        pipe.scheduler.config, timestep_spacing="leading", **options, **SCHEDULE_OPTIONS[schedule])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(ours: list[Image.Image], theirs: np.ndarray) -> int:
    a = np.stack([np.asarray(im, dtype=np.int16) for im in ours])
    b = (theirs * 255).round().astype(np.int16)
    assert b.std() > 10, "the reference image is flat: the comparison would prove nothing"
    return int(np.abs(a - b).max())


def _ours(folder, sampler, schedule="automatic", **call):
    pipe = sdlab.StableDiffusionPipeline(sdlab.load(folder), sampler=sampler, schedule=schedule)
    return pipe(PROMPT, **call).images


def _call(seed=3, **extra):
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=CFG, height=64, width=64,
                generator=torch.Generator().manual_seed(seed))
    return {**call, **extra}


@pytest.mark.parametrize("sampler", list(PAIRS))
def test_txt2img_matches_diffusers(folder, sampler):
    theirs = _reference("StableDiffusionPipeline", folder, sampler)(PROMPT, output_type="np", **_call()).images
    assert _max_diff(_ours(folder, sampler, **_call()), theirs) <= 2


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DPM++ 2M SDE", "UniPC"])
def test_karras_schedule_matches_diffusers(folder, sampler):
    ref = _reference("StableDiffusionPipeline", folder, sampler, "karras")
    theirs = ref(PROMPT, output_type="np", **_call()).images
    assert _max_diff(_ours(folder, sampler, "karras", **_call()), theirs) <= 2


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_non_square_batch_with_generator_list(folder, sampler):
    call = _call(height=48, width=80)
    call.update(num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    theirs = _reference("StableDiffusionPipeline", folder, sampler)(PROMPT, output_type="np", **call).images
    call["generator"] = [torch.Generator().manual_seed(s) for s in (5, 6)]
    ours = _ours(folder, sampler, **call)
    assert [im.size for im in ours] == [(80, 48)] * 2
    assert _max_diff(ours, theirs) <= 2


def _init_image(w=64, h=64):
    rng = np.random.default_rng(0)
    smooth = rng.random((h // 8, w // 8, 3)) * 255
    return Image.fromarray(smooth.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)


def _mask(w=64, h=64):
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM", "DPM++ 2M", "Heun"])
def test_img2img_matches_diffusers(folder, sampler):
    call = _call(image=_init_image(), strength=0.6)
    del call["height"], call["width"]
    theirs = _reference("StableDiffusionImg2ImgPipeline", folder, sampler)(PROMPT, output_type="np", **call).images
    call["generator"] = torch.Generator().manual_seed(3)
    assert _max_diff(_ours(folder, sampler, **call), theirs) <= 2


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_model_matches_diffusers(inpaint_folder, sampler, strength):
    call = _call(image=_init_image(), mask_image=_mask(), strength=strength)
    ref = _reference("StableDiffusionInpaintPipeline", inpaint_folder, sampler)
    theirs = ref(PROMPT, output_type="np", **call).images
    call["generator"] = torch.Generator().manual_seed(3)
    assert _max_diff(_ours(inpaint_folder, sampler, **call), theirs) <= 2


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_mask_blending_inpaint_matches_diffusers(folder, sampler):
    """An ordinary model inpaints by blending. At strength < 1 sdlab equals diffusers. (At strength 1
    diffusers' first step sees pure noise in the kept region; sdlab already puts it on the image's noising
    path, so the two differ there by design; see test_mask_blending_keeps_unmasked_region.)"""
    call = _call(image=_init_image(), mask_image=_mask(), strength=0.75)
    theirs = _reference("StableDiffusionInpaintPipeline", folder, sampler)(PROMPT, output_type="np", **call).images
    call["generator"] = torch.Generator().manual_seed(3)
    assert _max_diff(_ours(folder, sampler, **call), theirs) <= 2


def test_mask_blending_keeps_unmasked_region(folder):
    model = sdlab.load(folder)
    init = _init_image()
    params = sdlab.GenerationParams(prompt=PROMPT, init_image=init, mask=_mask(), strength=1.0, steps=6, seed=1,
                                    cfg_scale=CFG)
    result = sdlab.generate(model, params)
    # The kept region's final latent is exactly the image's latent (decode-identical to img2img at strength 0).
    keep = _mask().resize((32, 32), Image.Resampling.NEAREST)
    keep = torch.from_numpy(np.asarray(keep) < 128)
    reference = sdlab.generate(model, params.replace(mask=None, strength=0.0)).latents
    assert torch.allclose(result.latents[..., keep], reference[..., keep], atol=1e-5)


def test_clip_skip_follows_diffusers_convention(folder):
    """diffusers' clip_skip=1 is sdlab's (A1111's) clip_skip=2: the penultimate layer, then the final layer
    norm. (diffusers 0.42's own clip_skip path breaks with transformers 5, so the reference context is built
    the way it computes it and passed as prompt_embeds.) Compared without guidance: diffusers encodes the
    negative prompt without clip skip, while sdlab, like A1111, skips the same layers for both."""
    ref = _reference("StableDiffusionPipeline", folder, "Euler")
    ids = ref.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = ref.text_encoder.final_layer_norm(hidden)
    call = _call(guidance_scale=1.0)
    del call["negative_prompt"]
    theirs = ref(prompt_embeds=embeds, output_type="np", **call).images
    call["generator"] = torch.Generator().manual_seed(3)
    plain = ref(PROMPT, output_type="np", **_call(guidance_scale=1.0)).images
    assert _max_diff(_ours(folder, "Euler", clip_skip=1, **call), theirs) <= 2
    assert np.abs(plain - theirs).max() > 2 / 255  # clip skip changes the image beyond the tolerance


def test_batch_image_is_reproducible_alone(folder):
    model = sdlab.load(folder)
    params = sdlab.GenerationParams(prompt=PROMPT, steps=6, sampler="Euler a", seed=100, batch_size=3)
    batch = sdlab.generate(model, params).images
    alone = sdlab.generate(model, params.replace(seed=102, batch_size=1)).images[0]
    assert np.abs(np.asarray(batch[2], np.int16) - np.asarray(alone, np.int16)).max() <= 1
    assert np.abs(np.asarray(batch[0], np.int16) - np.asarray(alone, np.int16)).max() > 10


def test_v_prediction_model(tmp_path):
    """A v-prediction model (SD 2.x 768) through diffusers and sdlab gives the same image."""
    torch.manual_seed(0)
    folder = tmp_path / "v"
    sdlab.Model.build(TINY.replace(prediction="v_prediction")).save(folder)
    ref = _reference("StableDiffusionPipeline", folder, "DPM++ 2M")
    assert ref.scheduler.config.prediction_type == "v_prediction"
    theirs = ref(PROMPT, output_type="np", **_call()).images
    assert _max_diff(_ours(folder, "DPM++ 2M", **_call()), theirs) <= 2


def test_step_callback_and_interrupt(folder):
    model = sdlab.load(folder)
    seen = []
    stop_after = 3
    result = sdlab.generate(
        model, sdlab.GenerationParams(prompt=PROMPT, steps=8, seed=1),
        callback=lambda info: seen.append((info.step, info.total, tuple(info.denoised.shape))),
        interrupt=lambda: len(seen) >= stop_after,
    )
    assert result.interrupted and len(result.images) == 1
    assert seen == [(i, 8, (1, 4, 32, 32)) for i in range(1, stop_after + 1)]


def test_long_prompt_is_chunked_not_truncated(folder):
    model = sdlab.load(folder)
    long = ", ".join(["a red circle"] * 30)  # ~ 120 tokens
    params = sdlab.GenerationParams(prompt=long, steps=2, seed=1).resolved(model.config)
    cut = params.replace(prompt=", ".join(["a red circle"] * 18))
    a = sample_batch(model, [params.prompt], [""], params, torch.Generator().manual_seed(1)).latents
    b = sample_batch(model, [cut.prompt], [""], cut, torch.Generator().manual_seed(1)).latents
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_zero_terminal_snr_trailing_and_guidance_rescale(tmp_path, sampler):
    """Lin et al. 2023's recipe: v-prediction, zero-terminal-SNR betas, trailing timesteps, guidance
    rescale. The model's scheduler_config carries the first three; both pipelines follow it."""
    torch.manual_seed(0)
    folder = tmp_path / "zsnr"
    schedule = dataclasses.replace(TINY.schedule, zero_terminal_snr=True, timestep_spacing="trailing")
    sdlab.Model.build(TINY.replace(prediction="v_prediction", schedule=schedule)).save(folder)
    ref = getattr(diffusers, "StableDiffusionPipeline").from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False)
    scheduler, options = PAIRS[sampler]
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, **options)
    assert ref.scheduler.config.rescale_betas_zero_snr and ref.scheduler.config.timestep_spacing == "trailing"
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, output_type="np", guidance_rescale=0.7, **_call()).images
    ours = _ours(folder, sampler, guidance_rescale=0.7, **_call())
    assert _max_diff(ours, theirs) <= 2
