"""Denoisers: a network that predicts eps or v, wrapped as D(x, sigma) -> x0 for the samplers.

Conventions (k-diffusion, Karras et al. 2022): x = x0 + sigma * noise; the network sees the DDPM latent
c_in * x with c_in = 1 / sqrt(sigma^2 + 1) and the timestep of sigma in the training table (fractional
between entries, interpolated in log-sigma).

What the network predicts (eps, v) is its `sdlab.diffusion.parameterization` (c_skip, c_out, c_in):
- eps prediction (Ho et al. 2020): D = x - sigma * eps.
- v prediction (Salimans & Ho 2022, "Progressive Distillation"): D = c_skip * x + c_out * v with
  c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).

`ModelDenoiser` does the scalings for one `Conditioning`; `GuidedDenoiser` binds the conditioning and
applies classifier-free guidance (Ho & Salimans 2022) with one batched network call, plus guidance
rescale (Lin et al. 2023, section 3.4); `MaskedDenoiser` inpaints with an ordinary (4-channel) model by
pinning the unmasked region to the original latent. 9-channel inpainting models get their extra input
channels (mask, masked-image latents) through the conditioning's `concat`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlab.diffusion.conditioning import Conditioning, batch_for_guidance, run_network
from sdlab.diffusion.control import control_residuals
from sdlab.diffusion.parameterization import PARAMETERIZATIONS, get_parameterization
from sdlab.diffusion.schedules import NoiseSchedule

# unet(x_in (B, C, h, w), t (B,), context (B, T, D), **other conditioning parts) -> eps or v (B, 4, h, w)
Network = Callable[..., torch.Tensor]
PREDICTIONS = tuple(PARAMETERIZATIONS)  # "epsilon", "v_prediction"


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) float32 tensor on x's device, from a scalar or a (B,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to scale images."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class ModelDenoiser:
    """D(x, sigma, cond) -> x0 for a network that predicts eps or v; `cond` a `Conditioning`.

    quantize: feed the network the nearest training timestep instead of the interpolated one (diffusers'
    DPM-Solver and UniPC schedulers do this on Karras sigmas; A1111 does not by default).
    """

    def __init__(self, network: Network, schedule: NoiseSchedule, prediction: str = "epsilon", *,
                 quantize: bool = False):
        self.parameterization = get_parameterization(prediction)
        self.network, self.schedule, self.prediction, self.quantize = network, schedule, prediction, quantize

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def network_output(self, x, sigma, cond: Conditioning) -> torch.Tensor:
        """The raw network output (eps or v) at x, for per-sample sigmas (B,)."""
        x_in = x * _bcast(self.parameterization.c_in(sigma), x)  # the DDPM latent
        t = self.sigma_to_t(sigma)
        # Control networks read the 4-channel latent, also for inpainting models (as diffusers' pipelines).
        control = None if cond.control is None else control_residuals(cond.control, x_in, t, sigma, cond.context,
                                                                       cond.added)
        if cond.concat is not None:
            x_in = torch.cat([x_in, cond.concat.to(x_in.dtype)], dim=1)  # (B, 4 + 5, h, w) for inpainting models
        return run_network(self.network, x_in, t, cond, control)

    def to_denoised(self, x, sigma, output) -> torch.Tensor:
        """x0 from the network output at x, for per-sample sigmas (B,)."""
        return self.parameterization.denoised(x, sigma, output)

    def __call__(self, x, sigma, cond: Conditioning) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        return self.to_denoised(x, sigma, self.network_output(x, sigma, cond))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the per-sample std of the conditional output.

    Counteracts over-exposure at high guidance scales, needed with zero-terminal-SNR models.
    """
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class GuidedDenoiser:
    """D(x, sigma) -> x0 with the conditioning bound and classifier-free guidance.

    cond, uncond: `Conditioning`s of B samples. With scale == 1 (or no uncond) only the conditional pass
    runs; otherwise one network call on the batch [uncond; cond] (2B, `batch_for_guidance`). Guidance and
    its rescale act on the raw network output (eps or v), as in the reference pipelines.
    """

    def __init__(self, model: ModelDenoiser, cond: Conditioning, uncond: Conditioning | None = None,
                 scale: float = 1.0, *, rescale: float = 0.0):
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale = scale, rescale

    @property
    def sigma_to_t(self):
        return self.model.sigma_to_t

    @property
    def schedule(self) -> NoiseSchedule:
        return self.model.schedule

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.scale != 1.0

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        if not self.guided:
            output = self.model.network_output(x, sigma, self.cond)
        else:
            output = self._guided_output(x, sigma)
        return self.model.to_denoised(x, sigma, output)

    def _guided_output(self, x, sigma) -> torch.Tensor:
        both = self.model.network_output(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                         batch_for_guidance(self.uncond, self.cond))
        uncond, cond = both.chunk(2)  # each (B, 4, h, w)
        guided = uncond + self.scale * (cond - uncond)
        return rescale_guidance(guided, cond, self.rescale) if self.rescale > 0 else guided


class MaskedDenoiser:
    """Inpainting with an ordinary model: outside the mask, x is the original latent noised to sigma.

    mask: (B or 1, 1, h, w), 1 where to repaint (diffusers' convention); init_latent: (B, 4, h, w) the
    image's latent; noise: (B, 4, h, w) the fixed noise to re-noise it with (use the initial noise).
    Each call replaces the kept region of the input with init_latent + sigma * noise and of the output with
    init_latent, so after every step (for any sampler) the kept region sits on the original image's noising
    path, and the final latent keeps it exactly.
    """

    def __init__(self, denoiser: Callable, init_latent: torch.Tensor, mask: torch.Tensor,
                 noise: torch.Tensor):
        self.denoiser, self.init_latent, self.mask, self.noise = denoiser, init_latent, mask, noise

    @property
    def sigma_to_t(self):
        return self.denoiser.sigma_to_t

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        known = self.init_latent + _bcast(sigma, x) * self.noise
        x = self.mask * x + (1 - self.mask) * known
        return self.mask * self.denoiser(x, sigma) + (1 - self.mask) * self.init_latent


class SwitchingDenoiser:
    """One sampling run over two models: `first` denoises until the switch, `second` from then on (A1111's
    refiner: the SDXL base lays out the image, the refiner finishes the last part of the same run; a
    multistep sampler keeps its history across the switch, as A1111's does).

    The switch is A1111's rule, checked at every evaluation (second-order samplers' extra evaluations
    included): the training timestep t nearest to sigma (by sigma distance, on `schedule`'s table of T)
    has completed the fraction (T - 1 - t) / T >= switch_at of the schedule. Once switched it stays.
    """

    def __init__(self, first: Callable, second: Callable, schedule: NoiseSchedule, switch_at: float):
        self.first, self.second, self.schedule, self.switch_at = first, second, schedule, switch_at
        self.switched = False

    @property
    def sigma_to_t(self):
        return self.first.sigma_to_t

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if not self.switched:
            level = torch.as_tensor(sigma, dtype=torch.float32).max().to(self.schedule.sigmas.device)
            t = int(torch.argmin((self.schedule.sigmas - level).abs()))
            total = self.schedule.num_timesteps
            self.switched = (total - 1 - t) / total >= self.switch_at
        return (self.second if self.switched else self.first)(x, sigma)
