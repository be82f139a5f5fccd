"""Noise schedules: the training schedule (betas -> alphas_cumprod -> sigmas) and the sampling sigmas.

sdlab samples in the "variance exploding" (VE) parametrisation of k-diffusion (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"): x = x0 + sigma * noise, where a
DDPM timestep t with cumulative alpha a_t corresponds to sigma_t = sqrt((1 - a_t) / a_t) and the DDPM
latent is x_t = x / sqrt(sigma_t^2 + 1) (`ve_to_vp`). A sampler walks down a tensor of sigmas that ends
in 0 (or, for the DDIM family in Stable Diffusion's own configuration, in the smallest training sigma).

Which sigmas a given number of steps uses follows diffusers' schedulers exactly, because the numerics
contract is parity with them. Their conventions differ per scheduler family (`TimestepStyle`):

- "k": Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ SDE (diffusers' k-diffusion ports). Karras and
  exponential schedules span the sigmas of the *spaced* timesteps.
- "ddim": DDIM, PLMS (PNDM), DDPM. "linspace" rounds to integer timesteps.
- "dpm": DPM++ 2M (SDE), UniPC (diffusers' multistep solvers). "leading" and "linspace" place n + 1 points
  and drop the last; Karras and exponential schedules span the whole training table.
- "lcm": Latent Consistency Models (Luo et al. 2023) and Trajectory Consistency Distillation (Zheng et al.
  2024), whose diffusers schedulers pick the same timesteps: a subset of a 50-step skipping schedule.

Timestep spacings ("linspace", "leading", "trailing") are those of Table 2 of Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", who also give the zero-terminal-SNR rescaling.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from sdlab.config import ScheduleConfig
from sdlab.errors import ParameterError

TimestepStyle = Literal["k", "ddim", "dpm", "lcm"]
Spacing = Literal["leading", "linspace", "trailing"]
FinalSigma = Literal["zero", "sigma_min"]

SPACINGS = ("leading", "linspace", "trailing")
STYLES = ("k", "ddim", "dpm", "lcm")
# A1111's "Schedule type" names. "automatic" and "normal" mean: the sampler's own timestep spacing.
SCHEDULES = ("automatic", "normal", "karras", "exponential", "uniform", "sgm_uniform", "simple")

# The smallest positive float16 subnormal: diffusers' stand-in for alphas_cumprod = 0 at the last
# timestep of a zero-terminal-SNR schedule, so that sigma_max stays finite (4096).
_ZERO_SNR_ALPHA = 2.0**-24


# --- the training schedule ----------------------------------------------------------------------


def betas_from_config(config: ScheduleConfig) -> torch.Tensor:
    """The DDPM betas (num_train_timesteps,), float32 as in the reference implementation."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    raise ParameterError(
        f"ScheduleConfig.beta_schedule={config.beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero signal (Lin et al. 2023, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """The discrete training schedule of a model, and conversions between timesteps and sigmas.

    `sigmas[t]` (float32, ascending in t) is the VE noise level of training timestep t. Timesteps between
    table entries are interpolated linearly in log-sigma, as k-diffusion's `DiscreteSchedule` does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.float()  # (T,)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,) float32
        self.log_sigmas = self.sigmas.double().log()  # (T,) float64 for the interpolation

    @classmethod
    def from_config(cls, config: ScheduleConfig, *, zero_terminal_snr: bool | None = None) -> NoiseSchedule:
        """The schedule of `config`; `zero_terminal_snr` overrides `config.zero_terminal_snr`."""
        if zero_terminal_snr is None:
            zero_terminal_snr = config.zero_terminal_snr
        betas = betas_from_config(config)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod[-1] = _ZERO_SNR_ALPHA
        return cls(alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
        """The (fractional) timestep of each sigma, by linear interpolation in log-sigma.

        With `quantize`, the nearest training timestep instead (nearest in log-sigma, i.e. the rounded
        interpolated timestep), which is what diffusers' multistep solvers feed the network on Karras sigmas.
        """
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.double().clamp(min=1e-10).log().to(self.log_sigmas.device)
        # Index of the last table entry at or below each sigma, kept in [0, T-2] so low + 1 exists.
        low = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1), right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        t = (low + w).reshape(sigma.shape)
        if quantize:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The sigma of each (fractional) timestep, interpolating log-sigma linearly (k-diffusion)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp().float()

    def sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """Sigmas at the given timesteps, interpolating sigma linearly (diffusers' `np.interp`)."""
        table = self.sigmas.numpy()
        return np.interp(timesteps, np.arange(len(table)), table)


def vp_to_ve(latents: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The inverse of `ve_to_vp`: the VE latent x0 + sigma eps of a DDPM latent at noise level sigma."""
    return latents * (torch.as_tensor(sigma, dtype=torch.float64) ** 2 + 1).sqrt().item()


def ve_to_vp(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The DDPM latent sqrt(a) x0 + sqrt(1 - a) eps of a VE latent x = x0 + sigma eps.

    Samplers return x at `sigmas[-1]`; when that is not 0 (DDIM and PLMS in SD's configuration end at the
    smallest training sigma), this gives the latent that diffusers returns. For sigma 0 it is the identity.
    """
    return x / (torch.as_tensor(sigma, dtype=torch.float64) ** 2 + 1).sqrt().item()


# --- sampling timesteps ---------------------------------------------------------------------------


def spaced_timesteps(
    num_train_timesteps: int, steps: int, spacing: Spacing = "leading", *, style: TimestepStyle = "k",
    steps_offset: int = 1,
) -> np.ndarray:
    """The descending training timesteps that `steps` sampling steps visit, as diffusers picks them.

    "leading" (SD's configuration, with steps_offset=1) starts at 0 and strides by T // n; "trailing" ends
    at T - 1; "linspace" spreads n points over [0, T - 1] (fractional for the "k" style).
    """
    _check_choice("spacing", spacing, SPACINGS)
    _check_choice("timestep style", style, STYLES)
    n, T = steps, num_train_timesteps
    if style == "lcm":
        return lcm_timesteps(T, n)
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    if style == "dpm":
        # diffusers' multistep solvers place n + 1 points and drop the last (t = 0).
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
        return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n)[::-1].copy()
        return timesteps.round() if style == "ddim" else timesteps.astype(np.float32).astype(np.float64)
    return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int = 50) -> np.ndarray:
    """LCM's and TCD's timesteps: `steps` evenly skipped ones out of the `original_steps`-step distillation
    schedule (diffusers' LCMScheduler / TCDScheduler with original_inference_steps=50)."""
    if not 1 <= steps <= original_steps:
        raise ParameterError(
            f"steps={steps}: the consistency-distilled samplers (LCM, TCD) take 1 to {original_steps} steps, a "
            f"subset of the {original_steps}-step schedule they were distilled on (original_inference_steps)")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # 999, 979, ..., 19
    indices = np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.float64)


# --- sigma schedules ---------------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """Sigmas evenly spaced in log-sigma, from sigma_max down to sigma_min."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)))


def make_sigmas(
    schedule_config: ScheduleConfig | NoiseSchedule,
    steps: int,
    schedule: str = "automatic",
    spacing: Spacing = "leading",
    *,
    style: TimestepStyle = "k",
    steps_offset: int = 1,
    final_sigma: FinalSigma = "zero",
    zero_terminal_snr: bool | None = None,
) -> torch.Tensor:
    """The descending sigmas (steps + 1,) float32 that a sampler walks through; the last is the final sigma.

    schedule: A1111's "Schedule type": "automatic"/"normal" (the timesteps of `spacing`, as the diffusers
    scheduler of the sampler's `style` chooses them), "karras", "exponential", "uniform" (k-diffusion's
    default: timesteps evenly spaced over [T - 1, 0]), "sgm_uniform" (n of n + 1 evenly spaced timesteps,
    Stability's sgm), "simple" (every (T / n)-th training sigma from the top, ComfyUI).
    final_sigma: "zero", or "sigma_min" to end at the smallest training sigma (diffusers' DDIM/PNDM with
    set_alpha_to_one=False, i.e. Stable Diffusion's configuration; see `ve_to_vp`).
    """
    _check_steps(steps)
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
    noise = _as_noise_schedule(schedule_config, zero_terminal_snr)
    sigmas = _schedule_sigmas(noise, steps, schedule, spacing, style, steps_offset)
    last = noise.sigma_min if final_sigma == "sigma_min" else 0.0
    return torch.cat([sigmas.float(), torch.tensor([last], dtype=torch.float32)])


def _schedule_sigmas(noise, steps, schedule, spacing, style, steps_offset) -> torch.Tensor:
    T = noise.num_timesteps
    if schedule == "uniform":
        return noise.t_to_sigma(torch.linspace(T - 1, 0, steps, dtype=torch.float64))
    if schedule == "sgm_uniform":
        return noise.t_to_sigma(torch.linspace(T - 1, 0, steps + 1, dtype=torch.float64)[:-1])
    if schedule == "simple":
        stride = T / steps
        return noise.sigmas.flip(0)[(torch.arange(steps) * stride).long()]
    spaced = torch.from_numpy(noise.sigmas_at(spaced_timesteps(T, steps, spacing, style=style,
                                                               steps_offset=steps_offset)))
    if schedule in ("automatic", "normal"):
        return spaced
    # diffusers' k-diffusion ports span the spaced sigmas; its multistep solvers the whole table.
    if style == "k":
        lo, hi = float(spaced.min()), float(spaced.max())
    else:
        lo, hi = noise.sigma_min, noise.sigma_max
    if schedule == "karras":
        return karras_sigmas(lo, hi, steps)
    return exponential_sigmas(lo, hi, steps)


def _as_noise_schedule(config, zero_terminal_snr: bool | None) -> NoiseSchedule:
    if isinstance(config, NoiseSchedule):
        return config
    return NoiseSchedule.from_config(config, zero_terminal_snr=zero_terminal_snr)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ParameterError(f"steps must be a positive integer, got {steps!r}")


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ParameterError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
