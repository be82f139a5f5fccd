"""Image parity with diffusers' SDXL pipelines: diffusers' own calls, with only the import changed, give the
same 8-bit images (<= 2/255) on tiny random-weight SDXL base / refiner / inpainting models: txt2img,
img2img, inpainting, the size/crop/aesthetic conditions, diffusers' empty-negative rule, the base + refiner
"ensemble of experts" (denoising_end / output_type="latent" / denoising_start), and A1111's refiner switch.

The tiny models' added-condition MLP is scaled up (x6) so that the size and crop numbers visibly change
the image (by 30-60 levels); with default initialisation they move it by ~3 levels, too little to test.
"""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.params import GenerationParams

PROMPT = "a red circle above a blue square"
CFG = 3.0  # moderate guidance keeps a random model's pixels from clipping
STEPS = 5
# sdlab sampler label -> (diffusers scheduler class, options)
PAIRS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
}


def _save(tmp_path_factory, config, name):
    torch.manual_seed(0)
    model = sdlab.Model.build(config)
    with torch.no_grad():
        for key, weight in model.unet.named_parameters():
            if key.startswith("add_embedding."):
                weight.mul_(6)
    return model.save(tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return _save(tmp_path_factory, TINY_SDXL, "base")


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return _save(tmp_path_factory, TINY_SDXL_REFINER, "refiner")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    config = TINY_SDXL.replace(name="tiny-sdxl-inpaint", unet=dataclasses.replace(TINY_SDXL.unet, in_channels=9))
    return _save(tmp_path_factory, config, "inpaint")


def _pair(cls_name, folder, sampler="Euler"):
    """(diffusers' pipeline, sdlab's) of the same class name on the same folder, with the same sampler."""
    theirs = getattr(diffusers, cls_name).from_pretrained(folder)
    scheduler, options = PAIRS[sampler]
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config, **options)
    theirs.set_progress_bar_config(disable=True)
    ours = getattr(sdlab, cls_name).from_pretrained(folder)
    ours.sampler = sampler
    return theirs, ours


def _run(pipe, *args, seed=1, **kwargs):
    return pipe(*args, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _max_diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max()) for x, y in zip(a, b))


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    return Image.fromarray((0.6 * ramp + 0.4 * rng.uniform(0, 255, (size, size, 3))).astype(np.uint8))


def _mask(size=64):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255
    return Image.fromarray(mask)


CALLS = {
    "defaults": {},
    "negative": {"negative_prompt": "blurry"},
    "empty negative given": {"negative_prompt": ""},  # encoded, unlike a negative prompt left out (zeros)
    "size conditions": {"original_size": (128, 96), "crops_coords_top_left": (8, 4), "target_size": (64, 48)},
    "negative sizes": {"negative_original_size": (32, 32), "negative_target_size": (64, 48),
                       "negative_crops_coords_top_left": (4, 4)},
    "one negative size": {"negative_original_size": (32, 32)},  # diffusers then uses the positive ids
    "rescale and batch": {"guidance_rescale": 0.7, "num_images_per_prompt": 2, "negative_prompt": "dark"},
    "non-square": {"height": 48, "width": 64},
}  # fmt: skip


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_txt2img_equals_diffusers(base_folder, call):
    theirs, ours = _pair("StableDiffusionXLPipeline", base_folder)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": CFG, "height": 64, "width": 64, **CALLS[call]}
    a, b = _run(theirs, PROMPT, **kwargs), _run(ours, PROMPT, **kwargs)
    assert len(a) == len(b) and a[0].size == b[0].size
    assert _max_diff(a, b) <= 2


@pytest.mark.parametrize("sampler", PAIRS)
def test_txt2img_samplers_and_default_size(base_folder, sampler):
    theirs, ours = _pair("StableDiffusionXLPipeline", base_folder, sampler)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": CFG}  # size: the model's own (64 for the tiny one)
    a, b = _run(theirs, PROMPT, **kwargs), _run(ours, PROMPT, **kwargs)
    assert b[0].size == (64, 64) and _max_diff(a, b) <= 2


@pytest.mark.parametrize("folder, extra", [
    ("base_folder", {}),
    ("refiner_folder", {}),
    ("refiner_folder", {"aesthetic_score": 8.0, "negative_aesthetic_score": 1.0, "crops_coords_top_left": (8, 0),
                        "negative_crops_coords_top_left": (0, 8), "original_size": (96, 96)}),
], ids=["base", "refiner", "refiner-conditions"])  # fmt: skip
def test_img2img_equals_diffusers(request, folder, extra):
    theirs, ours = _pair("StableDiffusionXLImg2ImgPipeline", request.getfixturevalue(folder))
    kwargs = {"image": _image(), "num_inference_steps": STEPS, "guidance_scale": CFG, "negative_prompt": "x", **extra}
    for strength in (None, 0.6):  # None: diffusers' default 0.3
        options = {} if strength is None else {"strength": strength}
        assert _max_diff(_run(theirs, PROMPT, **kwargs, **options), _run(ours, PROMPT, **kwargs, **options)) <= 2


@pytest.mark.parametrize("folder", ["inpaint_folder", "base_folder"], ids=["9-channel", "blended"])
def test_inpaint_equals_diffusers(request, folder):
    theirs, ours = _pair("StableDiffusionXLInpaintPipeline", request.getfixturevalue(folder))
    kwargs = {"image": _image(), "mask_image": _mask(), "num_inference_steps": STEPS, "guidance_scale": CFG}
    for strength in (None, 0.7):  # None: diffusers' 0.9999 (one step skipped, the image's latents noised)
        options = {} if strength is None else {"strength": strength}
        assert _max_diff(_run(theirs, PROMPT, **kwargs, **options), _run(ours, PROMPT, **kwargs, **options)) <= 2


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])  # diffusers carries x0 + sigma eps / DDPM latents
def test_ensemble_of_experts_equals_diffusers(base_folder, refiner_folder, sampler):
    """diffusers' documented base + refiner example, with only the import changed."""
    base_ref, base = _pair("StableDiffusionXLPipeline", base_folder, sampler)
    refiner_ref, refiner = _pair("StableDiffusionXLImg2ImgPipeline", refiner_folder, sampler)
    common = {"num_inference_steps": 10, "guidance_scale": CFG}
    theirs = _run(base_ref, PROMPT, denoising_end=0.7, output_type="latent", **common)
    ours = _run(base, PROMPT, denoising_end=0.7, output_type="latent", **common)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    a = _run(refiner_ref, PROMPT, image=theirs, denoising_start=0.7, **common)
    b = _run(refiner, PROMPT, image=ours, denoising_start=0.7, **common)
    assert _max_diff(a, b) <= 2
    whole = _run(base, PROMPT, **common)
    assert _max_diff(whole, b) > 2  # the refiner did the last steps


def test_a1111_refiner_switch(base_folder, refiner_folder):
    """`generate(model, params, refiner=...)`: one sampling run whose last part the refiner denoises, switched
    by A1111's rule. With a first-order sampler (no history to carry over) that is exactly diffusers'
    ensemble at the same split; the base evaluates the steps at timesteps >= 200 (for 0.8), the refiner the rest."""
    base, refiner = sdlab.Model.load(base_folder), sdlab.Model.load(refiner_folder)
    calls = {"base": [], "refiner": []}
    for name, model in (("base", base), ("refiner", refiner)):
        model.unet.register_forward_pre_hook(lambda m, args, name=name: calls[name].append(float(args[1].max())))
    params = GenerationParams(prompt=PROMPT, steps=10, sampler="Euler", cfg_scale=CFG, seed=3, width=64,
                              height=64, refiner_switch_at=0.8)
    switched = sdlab.generate(base, params, refiner=refiner).images
    assert calls["base"] and calls["refiner"]
    assert min(calls["base"]) >= 200 and max(calls["refiner"]) < 200

    base_ref = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder)
    refiner_ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    generator = torch.Generator().manual_seed(3)
    common = {"num_inference_steps": 10, "guidance_scale": CFG, "generator": generator}
    latents = base_ref(PROMPT, denoising_end=0.8, output_type="latent", **common).images
    ensemble = refiner_ref(PROMPT, image=latents, denoising_start=0.8, **common).images
    assert _max_diff(switched, ensemble) <= 2


def test_refiner_errors(base_folder):
    from sdlab.config import TINY
    from sdlab.errors import ParameterError

    base = sdlab.Model.load(base_folder)
    other = sdlab.Model.build(TINY.replace(vae=dataclasses.replace(TINY.vae, scaling_factor=0.5)))
    params = GenerationParams(prompt=PROMPT, steps=2, seed=0, width=64, height=64)
    with pytest.raises(ParameterError, match="other latents"):
        sdlab.generate(base, params, refiner=other)
    with pytest.raises(ParameterError, match="refiner_switch_at"):
        sdlab.generate(base, params.replace(refiner_switch_at=1.5), refiner=base)


def test_loading_forms(base_folder, refiner_folder, tmp_path):
    """DiffusionPipeline picks the family's class; components are shared by name (diffusers' refiner
    example); single files load with from_single_file."""
    base = sdlab.DiffusionPipeline.from_pretrained(base_folder)
    assert type(base) is sdlab.StableDiffusionXLPipeline
    refiner = sdlab.DiffusionPipeline.from_pretrained(refiner_folder, text_encoder_2=base.text_encoder_2)
    assert type(refiner) is sdlab.StableDiffusionXLImg2ImgPipeline
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.tokenizer_2 is not None
    with pytest.raises(sdlab.errors.ParameterError, match="vae="):
        sdlab.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, vae=base.unet)
    file = base.model.save(tmp_path / "base.safetensors", layout="single-file")
    single = sdlab.StableDiffusionXLPipeline.from_single_file(file)
    kwargs = {"num_inference_steps": 2, "guidance_scale": CFG}
    assert _max_diff(_run(single, PROMPT, **kwargs), _run(base, PROMPT, **kwargs)) == 0
    with pytest.raises(sdlab.errors.ParameterError, match="output_type='latent'"):
        refiner(PROMPT, image=_image(), denoising_start=0.8, num_inference_steps=2)


def test_output_types(base_folder):
    pipe = sdlab.StableDiffusionXLPipeline.from_pretrained(base_folder)
    kwargs = {"num_inference_steps": 2, "guidance_scale": CFG}
    pil = _run(pipe, PROMPT, **kwargs)[0]
    array = _run(pipe, PROMPT, output_type="np", **kwargs)
    tensor = _run(pipe, PROMPT, output_type="pt", **kwargs)
    assert array.shape == (1, 64, 64, 3) and tensor.shape == (1, 3, 64, 64)
    assert np.array_equal((array[0] * 255).round().astype(np.uint8), np.asarray(pil))
    with pytest.raises(sdlab.errors.ParameterError, match="output_type"):
        pipe(PROMPT, output_type="jpeg", num_inference_steps=1)


def test_fp16_vae_is_upcast_when_its_config_asks(base_folder):
    """SDXL's VAE overflows in fp16: with force_upcast it decodes (and encodes) in fp32, as diffusers does,
    and is left in fp16 afterwards."""
    model = sdlab.Model.load(base_folder, dtype=torch.float16)
    seen = []
    model.vae.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).dtype))
    decoder = model.vae.decoder if hasattr(model.vae, "decoder") else model.vae
    decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    from sdlab.generation import decode_latents

    decode_latents(model, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert seen and all(d == torch.float32 for d in seen)
    assert next(model.vae.parameters()).dtype == torch.float16
