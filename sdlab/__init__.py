"""sdlab: Stable Diffusion from scratch in PyTorch.

    import sdlab
    model = sdlab.load("path/to/stable-diffusion-v1-5")          # diffusers folder or .safetensors/.ckpt
    result = sdlab.generate(model, sdlab.GenerationParams(prompt="a lighthouse at dusk", seed=7))
    result.images[0].save("lighthouse.png")

Diffusers-style pipelines (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, their Img2Img / Inpaint
classes and `DiffusionPipeline`) are there too for existing scripts, and so are diffusers' ControlNet classes
(`ControlNetModel`, `StableDiffusionControlNetPipeline` and its Img2Img / Inpaint / SDXL variants).
"""

from .config import PRESETS, ModelConfig
from .control.pipelines import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from .generation import GenerationResult, StepInfo, decode_latents, generate
from .model import Model
from .params import GenerationParams
from .pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

__version__ = "0.1.0"

load = Model.load

__all__ = [
    "load", "generate", "GenerationParams", "GenerationResult", "StepInfo", "Model", "ModelConfig", "PRESETS",
    "decode_latents", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline", "DiffusionPipeline", "AutoPipelineForText2Image",
    "AutoPipelineForImage2Image", "AutoPipelineForInpainting", "ControlNetModel", "MultiControlNetModel",
    "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
]  # fmt: skip
