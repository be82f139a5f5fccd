"""sdlab: Stable Diffusion from scratch in PyTorch.

    import sdlab
    model = sdlab.load("path/to/stable-diffusion-v1-5")          # diffusers folder or .safetensors/.ckpt
    result = sdlab.generate(model, sdlab.GenerationParams(prompt="a lighthouse at dusk", seed=7))
    result.images[0].save("lighthouse.png")

A diffusers-style `StableDiffusionPipeline` (and Img2Img / Inpaint) is there too for existing scripts.
"""

from .config import PRESETS, ModelConfig
from .generation import GenerationResult, StepInfo, decode_latents, generate
from .model import Model
from .params import GenerationParams
from .pipeline import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

__version__ = "0.1.0"

load = Model.load

__all__ = [
    "load", "generate", "GenerationParams", "GenerationResult", "StepInfo", "Model", "ModelConfig", "PRESETS",
    "decode_latents", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
]  # fmt: skip
