"""diffusers' ControlNet classes, so that their examples run with only the import changed:

    from sdlab import ControlNetModel, StableDiffusionControlNetPipeline
    controlnet = ControlNetModel.from_pretrained("lllyasviel/sd-controlnet-canny", torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", controlnet=controlnet)
    image = pipe("a bird", image=canny_image, num_inference_steps=20).images[0]

Each pipeline turns its control arguments into `sdlab.control.ControlUnit`s (resized as diffusers does:
"Just Resize") and runs the model's pipeline with them. `controlnet=[a, b]` (or `MultiControlNetModel([a,
b])`) takes one image per net and a value or a list for the scale and the step window, as diffusers does.
"""

from __future__ import annotations

import os

import torch

from sdlab.control.files import load_controlnet
from sdlab.control.unit import ControlUnit
from sdlab.errors import ParameterError
from sdlab.pipeline import (PipelineOutput, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                            StableDiffusionXLPipeline, resolve_model_path)


class ControlNetModel:
    """`ControlNetModel.from_pretrained(folder or id)` / `.from_single_file(file)`: an sdlab ControlNet."""

    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, subfolder: str | None = None, plain: bool = False, **_ignored):
        path = resolve_model_path(path_or_id)
        path = path / subfolder if subfolder else path
        return load_controlnet(path, dtype=torch_dtype or torch.float32, variant=variant, plain=plain)

    from_single_file = from_pretrained


class MultiControlNetModel(list):
    """Several ControlNets at once (their residuals add up): a list, as diffusers' class wraps one."""


class _ControlNetCall:
    """The control arguments of diffusers' ControlNet pipelines, on top of the model's own pipeline class."""

    default_conditioning_scale = 1.0
    takes_init_image = False  # img2img / inpainting: `image` is the picture, `control_image` the control

    @classmethod
    def from_pretrained(cls, path_or_id, *, controlnet=None, **kwargs):
        if controlnet is None:
            raise ParameterError(f"{cls.__name__}.from_pretrained needs controlnet= (ControlNetModel.from_pretrained"
                                 "(...) or a list of them)")
        pipe = super().from_pretrained(path_or_id, **kwargs)
        pipe.controlnet = controlnet
        return pipe

    @torch.no_grad()
    def __call__(self, prompt, *args, image=None, control_image=None, height: int | None = None,
                 width: int | None = None, controlnet_conditioning_scale=None, guess_mode: bool = False,
                 control_guidance_start=0.0, control_guidance_end=1.0, **kwargs) -> PipelineOutput:
        hints = control_image if self.takes_init_image else image
        if hints is None:
            raise ParameterError("a ControlNet pipeline needs its control image: "
                                 + ("control_image=" if self.takes_init_image else "image="))
        units = self.control_units(hints, controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                   control_guidance_end)
        if not self.takes_init_image and (height is None or width is None):  # diffusers: the control image's size
            h, w = _size(units[0].image)
            height, width = height or h // 8 * 8, width or w // 8 * 8
        init = image if self.takes_init_image else None
        return super().__call__(prompt, *args, image=init, height=height, width=width, control=units, **kwargs)

    def control_units(self, images, scales, guess_mode, starts, ends) -> tuple[ControlUnit, ...]:
        nets = list(self.controlnet) if isinstance(self.controlnet, (list, tuple)) else [self.controlnet]
        if len(nets) == 1:
            images = [images]
        elif not isinstance(images, (list, tuple)) or len(images) != len(nets):
            raise ParameterError(f"{len(nets)} ControlNets need a list of {len(nets)} control images, one each")
        scales = self.default_conditioning_scale if scales is None else scales
        scales, starts, ends = (_each(v, len(nets), name) for v, name in (
            (scales, "controlnet_conditioning_scale"), (starts, "control_guidance_start"),
            (ends, "control_guidance_end")))
        mode = "guess" if guess_mode else "balanced"
        return tuple(ControlUnit(net, _one(img), scale=s, start=a, end=b, mode=mode, resize_mode="Just Resize")
                     for net, img, s, a, b in zip(nets, images, scales, starts, ends))


def _each(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ParameterError(f"{name} has {len(values)} values for {n} ControlNets; give one value or one per net")
    return values


def _one(image):
    """diffusers takes a control image as a PIL image, a tensor, or a one-element list of either."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ParameterError("one control image per ControlNet (a list of several is a batch, which sdlab's "
                                 "drop-in pipelines do not take: pass one image)")
        image = image[0]
    return image


def _size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a (B, C, H, W) tensor."""
    return (image.shape[-2], image.shape[-1]) if isinstance(image, torch.Tensor) else (image.height, image.width)


class StableDiffusionControlNetPipeline(_ControlNetCall, StableDiffusionPipeline):
    """txt2img with ControlNets: `image` is the control image (or one per net)."""


class StableDiffusionControlNetImg2ImgPipeline(_ControlNetCall, StableDiffusionPipeline):
    """img2img with ControlNets: `image` the picture, `control_image` the control image(s)."""

    default_conditioning_scale = 0.8
    takes_init_image = True


class StableDiffusionControlNetInpaintPipeline(_ControlNetCall, StableDiffusionPipeline):
    """Inpainting with ControlNets: `image`, `mask_image`, and `control_image` (for the inpainting ControlNet,
    `sdlab.control.preprocess.inpaint_hint(image, mask)`: the picture with -1 where the mask is)."""

    default_conditioning_scale = 0.5
    takes_init_image = True

    def _strength(self, mask_image) -> float:
        return 1.0


class StableDiffusionXLControlNetPipeline(_ControlNetCall, StableDiffusionXLPipeline):
    """SDXL txt2img with ControlNets: `image` is the control image (or one per net)."""


class StableDiffusionXLControlNetImg2ImgPipeline(_ControlNetCall, StableDiffusionXLImg2ImgPipeline):
    """SDXL img2img with ControlNets."""

    default_conditioning_scale = 0.8
    takes_init_image = True
