"""Few-step models through diffusers' own examples with the import changed: SD-Turbo / SDXL-Turbo folders
(Euler with trailing timesteps, guidance_scale=0.0, 1-4 steps) loaded by `AutoPipelineForText2Image` /
`AutoPipelineForImage2Image`, as their model cards do. Tiny random models whose folders carry such a
scheduler; images within 2/255 of diffusers'. (LCM: test_generation_parity.py; TCD: test_tcd.py.)"""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.config import TINY
from sdlab.families.sdxl import TINY_SDXL

PROMPT = "a red circle above a blue square"


def _turbo_folder(tmp_path_factory, config, name):
    """A random model saved by sdlab, whose scheduler diffusers then rewrites as the Turbo folders have it."""
    torch.manual_seed(0)
    folder = sdlab.Model.build(config).save(tmp_path_factory.mktemp(name) / "model")
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def turbo(request, tmp_path_factory):
    config = TINY if request.param == "sd" else TINY_SDXL
    return _turbo_folder(tmp_path_factory, config, request.param)


def _image(size=64) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a[0], dtype=int) - np.asarray(b[0], dtype=int)).max())


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_text2image_turbo(turbo, steps):
    """The model card's call: AutoPipelineForText2Image, guidance_scale=0.0, 1-4 steps."""
    pipes = [module.AutoPipelineForText2Image.from_pretrained(turbo) for module in (diffusers, sdlab)]
    assert type(pipes[1]).__name__ == type(pipes[0]).__name__  # StableDiffusion(XL)Pipeline
    assert pipes[1].sampler == "Euler"
    images = [pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(3)).images for pipe in pipes]
    assert _max_diff(*images) <= 2


def test_image2image_turbo(turbo):
    """The model card's img2img call: 2 steps at strength 0.5 (one denoising step), guidance_scale=0.0."""
    pipes = [module.AutoPipelineForImage2Image.from_pretrained(turbo) for module in (diffusers, sdlab)]
    assert type(pipes[1]).__name__ == type(pipes[0]).__name__  # StableDiffusion(XL)Img2ImgPipeline
    images = [pipe(PROMPT, image=_image(), num_inference_steps=2, strength=0.5, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(3)).images for pipe in pipes]
    assert _max_diff(*images) <= 2


def test_inpainting_autopipeline_picks_the_inpaint_class(turbo):
    assert type(sdlab.AutoPipelineForInpainting.from_pretrained(turbo)).__name__ == \
        type(diffusers.AutoPipelineForInpainting.from_pretrained(turbo)).__name__
