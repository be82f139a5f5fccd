"""Sample images during training, to watch a model learn: Euler on the probability-flow ODE (Karras et al.
2022) with classifier-free guidance, through `sdlab.diffusion`'s denoisers and sampler table.

Deliberately smaller than `sdlab.generation`: no prompt syntax, and the text encoder's own context length
(small models trained here may use fewer than CLIP's 77 positions).
"""

from __future__ import annotations

import torch
from PIL import Image

from ..diffusion.conditioning import Conditioning
from ..diffusion.denoisers import GuidedDenoiser, ModelDenoiser
from ..diffusion.registry import get_sampler
from ..diffusion.schedules import NoiseSchedule
from ..families import family_of, latent_format


@torch.no_grad()
def sample_images(model, prompts: list[str], *, size: int, steps: int, guidance: float, seed: int = 0) -> list[Image.Image]:
    """One image per prompt, `size` pixels square, from noise drawn with a generator seeded by `seed`."""
    device, n = model.device, len(prompts)
    spec = get_sampler("euler")
    sigmas = spec.make_sigmas(model.config.schedule, steps)
    cond, uncond = _context(model, prompts, size), _context(model, [""] * n, size)
    network = ModelDenoiser(model.unet, NoiseSchedule.from_config(model.config.schedule), model.config.prediction)
    denoiser = GuidedDenoiser(network, cond, uncond, guidance)
    vae = model.config.vae
    side = size // vae.downscale
    generator = torch.Generator().manual_seed(seed)
    latents = latent_format(model.config)
    noise = torch.randn((n, latents.channels, side, side), generator=generator)
    x = (noise * spec.initial_noise_scale(sigmas)).to(device, model.dtype)
    x = spec.sample(denoiser, x, sigmas.to(device), generator=generator)  # (n, C, side, side), scaled latents
    pixels = model.vae.decode(latents.from_diffusion(x))  # (n, 3, size, size) in [-1, 1]
    return [_to_pil(p) for p in pixels]


def _context(model, prompts: list[str], size: int) -> Conditioning:
    """The conditioning of plain prompts, built as the training objective builds it (the family's conditioner),
    with the size conditions of a whole, uncropped `size` square (what SDXL conditions on; others ignore them)."""
    family = family_of(model.config)
    whole = {"original_size": (size, size), "crop_top_left": (0, 0), "target_size": (size, size)}
    return family.condition_from_inputs(model.components, family.conditioner_inputs(model, prompts, [whole] * len(prompts)))


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
