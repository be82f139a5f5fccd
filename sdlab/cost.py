"""What a generation costs, in floating-point operations, known before any network runs.

A server admits a request by its cost, not by its side lengths alone: 2 steps at 2048x2048 with 16 images
is cheap for the UNet but spends minutes in the VAE decoder's mid-block self-attention, which is
quadratic in the latent pixels. So every network's cost is counted as a function of the latent pixels p:

    flops(p) = constant + linear * p + quadratic * p^2

which is exact for these networks (convolutions and cross-attention are linear in p, self-attention is
quadratic, the time and text projections are constant) as long as the sizes divide through the
network's down-samplings. The three coefficients come from counting one forward pass at three small sizes
with torch's FlopCounterMode on networks built on the meta device (no weights, no memory, ~1 s for SD 1.5);
then any request is priced instantly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import families
from .config import ModelConfig
from .diffusion.registry import get_sampler
from .params import GenerationParams

CHUNK_TOKENS = 75  # A1111 prompt chunks (77 with the start and end tokens)


@dataclass(frozen=True)
class NetworkCost:
    """FLOP of one forward pass for one image, as a function of its latent pixels (h * w)."""

    constant: float
    linear: float
    quadratic: float

    def flops(self, latent_pixels: int) -> float:
        return self.constant + self.linear * latent_pixels + self.quadratic * latent_pixels**2

    @classmethod
    def fit(cls, pixels: tuple[int, int, int], flops: tuple[float, float, float]) -> NetworkCost:
        """The three coefficients through three (pixels, flops) counts (a 3x3 linear solve)."""
        p = np.array(pixels, dtype=np.float64)
        coefficients = np.linalg.solve(np.stack([np.ones(3), p, p**2], axis=1), np.array(flops, dtype=np.float64))
        return cls(*(max(0.0, float(c)) for c in coefficients))


@dataclass(frozen=True)
class CostModel:
    """The per-network costs of one model config."""

    unet: NetworkCost  # one evaluation, batch 1
    decode: NetworkCost  # VAE decoder, one image
    encode: NetworkCost  # VAE encoder, one image
    text_chunk: float  # the text encoders (all of the family's), one 77-token chunk

    def request_flops(self, config: ModelConfig, params: GenerationParams, *, n_iter: int = 1,
                      decodes_per_image: int = 1) -> float:
        """All the work of `n_iter` batches of `params` (resolved: width and height set). `decodes_per_image`
        counts extra decodes (e.g. one per step when every step's preview is recorded)."""
        f = config.vae.downscale
        pixels = (params.height // f) * (params.width // f)
        images = params.batch_size * n_iter
        guided = 1 if params.cfg_scale == 1.0 else 2
        chunks = guided * images * (1 + len(params.prompt) // CHUNK_TOKENS)  # a token is at least one character
        encodes = 0 if params.mode == "txt2img" else (2 if config.is_inpainting else 1) * n_iter
        return (unet_evaluations(params, n_iter) * self.unet.flops(pixels)
                + images * decodes_per_image * self.decode.flops(pixels)
                + encodes * self.encode.flops(pixels) + chunks * self.text_chunk)


def unet_evaluations(params: GenerationParams, n_iter: int = 1) -> int:
    """UNet passes of one image each: steps run x the sampler's evaluations per step x 2 with guidance."""
    steps = params.steps if params.mode == "txt2img" else min(int(params.steps * params.strength), params.steps)
    guided = 1 if params.cfg_scale == 1.0 else 2
    return steps * get_sampler(params.sampler).evaluations * guided * params.batch_size * n_iter


@functools.lru_cache(maxsize=16)
def cost_model(config: ModelConfig) -> CostModel:
    """Count the networks of `config` on the meta device (cached per config)."""
    from .nn.unet import UNet
    from .nn.vae import VAE

    family = families.family_of(config)
    with torch.device("meta"):
        unet, vae = UNet(config.unet), VAE(config.vae)
        texts = [family.components[name].build(config) for name in family.text_encoders]
    step = 2 ** (len(config.unet.channels) - 1)  # the latent must divide through the UNet's down-samplings
    sides = (step, 2 * step, 4 * step)
    pixels = tuple(s * s for s in sides)
    u = config.unet
    added = (torch.zeros(1, u.added_dim),) if u.added_condition else ()  # SDXL: pooled text + size numbers
    unet_flops = tuple(_count(unet, torch.zeros(1, u.in_channels, s, s), torch.zeros(1),
                              torch.zeros(1, 77, u.context_dim), *added) for s in sides)
    latent = config.vae.latent_channels
    decode_flops = tuple(_count(vae.decode, torch.zeros(1, latent, s, s)) for s in sides)
    f = config.vae.downscale
    encode_flops = tuple(_count(vae.encode, torch.zeros(1, config.vae.in_channels, s * f, s * f)) for s in sides)
    # (Its input check reads the ids, which meta tensors cannot: 2 FLOP per weight of its linears per token
    # is its cost to within the 77x77 attention, a few percent.)
    text_flops = sum(2.0 * 77 * m.weight.numel() for t in texts for m in t.modules() if isinstance(m, torch.nn.Linear))
    return CostModel(NetworkCost.fit(pixels, unet_flops), NetworkCost.fit(pixels, decode_flops),
                     NetworkCost.fit(pixels, encode_flops), text_flops)


def _count(fn, *inputs: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*(x.to("meta") for x in inputs))
    return float(counter.get_total_flops())


def describe_flops(flops: float) -> str:
    """12_345_000_000_000 -> '12.3 TFLOP'."""
    if flops <= 0:
        return "0 FLOP"
    unit = min(int(math.log10(flops) // 3), 5)
    return f"{flops / 10 ** (3 * unit):.3g} {['', 'k', 'M', 'G', 'T', 'P'][unit]}FLOP"
