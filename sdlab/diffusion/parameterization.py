"""What a denoising network predicts, as a small class: its scalings and its training target.

In the k-diffusion convention (Karras et al. 2022, x = x0 + sigma * n) a network F of the DDPM family is
used as

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

with c_in = 1 / sqrt(sigma^2 + 1) (the DDPM latent) and c_noise the training timestep of sigma (the
schedule's `sigma_to_t`) for every parameterization here; c_skip and c_out differ:

- eps (Ho et al. 2020): c_skip = 1, c_out = -sigma, target eps.
- v (Salimans & Ho 2022): c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1),
  target v = sqrt(a_t) eps - sqrt(1 - a_t) x0.

As Stability's `sgm` DenoiserScaling and k-diffusion's denoisers do, a new kind (EDM's, flow matching's)
is one more class here, not a branch in the sampler or the training loss.
"""

from __future__ import annotations

import torch

from sdlab.errors import ParameterError


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to scale images."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Parameterization:
    """The scalings of D(x, sigma) for per-sample sigmas (B,), and the training target; one instance each."""

    name: str  # what ModelConfig.prediction and scheduler_config.json's prediction_type say

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + 1) ** -0.5

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, h, w) from the network output at x: c_skip * x + c_out * output."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for x_t = sqrt(a) x0 + sqrt(1 - a) noise, a (B,)."""
        raise NotImplementedError

    def min_snr_weights(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023) for this target, from the SNR a / (1 - a) (B,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<parameterization {self.name}>"


class EpsPrediction(Parameterization):
    name = "epsilon"

    def denoised(self, x, sigma, output):
        return x - _bcast(sigma, x) * output  # c_skip = 1, c_out = -sigma

    def target(self, x0, noise, alphas):
        return noise

    def min_snr_weights(self, snr, gamma):
        return snr.clamp(max=gamma) / snr


class VPrediction(Parameterization):
    name = "v_prediction"

    def denoised(self, x, sigma, output):
        c_skip = _bcast(1 / (sigma**2 + 1), x)
        c_out = _bcast(-sigma * (sigma**2 + 1) ** -0.5, x)
        return c_skip * x + c_out * output

    def target(self, x0, noise, alphas):
        a = alphas[:, None, None, None]
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def min_snr_weights(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1)


PARAMETERIZATIONS: dict[str, Parameterization] = {p.name: p for p in (EpsPrediction(), VPrediction())}


def get_parameterization(prediction: str) -> Parameterization:
    """The parameterization of a prediction type ("epsilon", "v_prediction")."""
    if prediction not in PARAMETERIZATIONS:
        raise ParameterError(f"unknown prediction {prediction!r}; valid: {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[prediction]
