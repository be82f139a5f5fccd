"""The denoising objective of latent diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
Rombach et al. 2022 for the latent space and the text conditioning).

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,  a_t = alphas_cumprod[t],  t ~ U{0, ..., T-1}
    loss = w(t) * || net(x_t, t, text) - target ||^2,  target = eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models")

Options: Min-SNR-gamma weighting w(t) = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy"); offset noise, eps + s * n with n constant per
channel (Guttenberg 2023), so the model can learn very dark or bright images; caption dropout, training on
the empty prompt with some probability so that classifier-free guidance works (Ho & Salimans 2022).

All the randomness of a step is drawn for the *global* batch in one place (`draw_noise`), from a generator that
every process advances identically, and then sliced per process: N processes then compute what one
process with the same global batch computes, and a resumed run draws what the original run drew.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion.conditioning import Conditioning, run_network
from ..diffusion.parameterization import get_parameterization
from ..diffusion.schedules import NoiseSchedule
from ..families import Family
from ..nn.unet import UNet


@dataclass
class StepNoise:
    """The random draws of one (micro-)batch; each tensor's first dimension is the batch."""

    timesteps: torch.Tensor  # (B,) int64 in [0, T)
    noise: torch.Tensor  # (B, C, h, w): eps, offset noise included
    posterior: torch.Tensor  # (B, C, h, w): N(0, I) for sampling z from the VAE's posterior
    drop_caption: torch.Tensor  # (B,) bool

    def rows(self, start: int, stop: int) -> StepNoise:
        return StepNoise(*(t[start:stop] for t in (self.timesteps, self.noise, self.posterior, self.drop_caption)))


def draw_noise(generator: torch.Generator, batch: int, latent_shape: tuple[int, int, int], num_timesteps: int,
               *, offset_noise: float = 0.0, caption_dropout: float = 0.0) -> StepNoise:
    """Every random number of a diffusion training step for a batch of `batch` latents of `latent_shape`.

    Always draws the same tensors in the same order (whatever the options), so the stream of draws does not
    depend on which options are on.
    """
    channels = latent_shape[0]
    timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    offset = torch.randn((batch, channels, 1, 1), generator=generator)
    posterior = torch.randn((batch, *latent_shape), generator=generator)
    drop = torch.rand((batch,), generator=generator) < caption_dropout
    return StepNoise(timesteps, noise + offset_noise * offset, posterior, drop)


def snr_weights(alphas: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights for a_t values (B,); all ones when gamma is 0."""
    if gamma <= 0:
        return torch.ones_like(alphas)
    return get_parameterization(prediction).min_snr_weights(alphas / (1 - alphas), gamma)


def noised(x0: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a) x0 + sqrt(1 - a) eps, for a (B,) broadcast over (B, C, h, w)."""
    a = alphas[:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor, prediction: str) -> torch.Tensor:
    """The network's training target for a prediction type (its parameterization's)."""
    return get_parameterization(prediction).target(x0, noise, alphas)


class DiffusionObjective(nn.Module):
    """The diffusion loss as a module, so DistributedDataParallel can wrap everything that trains.

    forward(latents (B, C, h, w) scaled x_0, conditions (the family's `conditioner_inputs`: token ids (B, T)
    by text encoder, ...), timesteps (B,), noise (B, C, h, w)) -> (loss, {"mse": per-batch mean before weighting})
    The conditioning is built from `conditions` by the family's conditioner, as generation's is.
    `extra` holds further trained modules (LoRA adapters) so that DDP sees their parameters.
    """

    def __init__(self, unet: UNet, family: Family, text_encoders: Mapping[str, nn.Module], schedule: NoiseSchedule,
                 prediction: str, *, min_snr_gamma: float = 0.0, train_text_encoder: bool = False,
                 extra: nn.Module | None = None):
        super().__init__()
        self.unet, self.family, self.extra = unet, family, extra
        for name, network in text_encoders.items():  # by component name, so parameter names stay "text_encoder.*"
            self.add_module(name, network)
        self.text_encoder_names = tuple(text_encoders)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone(), persistent=False)
        self.prediction, self.min_snr_gamma, self.train_text_encoder = prediction, min_snr_gamma, train_text_encoder

    def condition(self, conditions: Mapping[str, torch.Tensor]) -> Conditioning:
        networks = {name: getattr(self, name) for name in self.text_encoder_names}
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.family.condition_from_inputs(networks, conditions)

    def forward(self, latents, conditions, timesteps, noise):
        alphas = self.alphas_cumprod[timesteps]  # (B,)
        prediction = run_network(self.unet, noised(latents, noise, alphas), timesteps, self.condition(conditions))
        goal = target(latents, noise, alphas, self.prediction)
        per_sample = (prediction.float() - goal.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        weighted = per_sample * snr_weights(alphas, self.min_snr_gamma, self.prediction)
        return weighted.mean(), {"mse": per_sample.detach().mean()}
