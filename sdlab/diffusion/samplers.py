"""Samplers: plain functions that walk a denoiser D(x, sigma) -> x0 down a tensor of sigmas.

Every sampler has the signature

    sample_X(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, **options) -> x

in the VE convention of k-diffusion (x = x0 + sigma * noise; `sigmas` descending, (steps + 1,), ending in
0 or in a final small sigma). `x` starts at sigmas[0]; the result is x at sigmas[-1].

- Randomness comes only from `generator`: each stochastic step draws
  `torch.randn(x.shape, generator=generator)` once after its network call, the order in which diffusers'
  schedulers draw theirs, so that the same generator gives the same images. SDE samplers also accept a
  `noise_sampler(sigma, sigma_next) -> unit noise`, e.g. a Brownian tree.
- `callback(info)` runs after every step's first network call with a dict: "step" (0-based), "total",
  "sigma", "sigma_next", "x" (the current sample, before the step) and "denoised" (the x0 estimate, for
  previews).
- `interrupt()` is checked before every step; when it returns True the sampler raises
  `SamplingInterrupted`, which carries the last x0 estimate (what A1111 shows on "Interrupt").

The samplers, their papers, and the diffusers scheduler each one reproduces are listed in `sdlab.diffusion.
registry`. Timestep-based samplers of diffusers (DDIM, PLMS, DDPM, UniPC, LCM, TCD) are written here as
functions of sigma: a DDIM step is exactly an Euler step in sigma, DDPM's posterior step is an ancestral
Euler step with eta = 1, PLMS is an Adams-Bashforth method on dx/dsigma.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sdlab import rng
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.errors import ParameterError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingInterrupted(Exception):
    """Raised by a sampler when `interrupt()` returned True. `denoised` is the last x0 estimate (or None)."""

    def __init__(self, step: int, x: torch.Tensor, denoised: torch.Tensor | None):
        super().__init__(f"sampling interrupted before step {step}")
        self.step, self.x, self.denoised = step, x, denoised


# --- shared maths ---------------------------------------------------------------------------------


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4): (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_to^2; eta = 1 is the DDPM posterior (Ho et al. 2020), eta = 0 the
    deterministic DDIM step (Song et al. 2021), in between DDIM's eta.
    """
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(torch.as_tensor(sigma_to),
                             eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def add_churn(x, sigma, steps: int, generator, *, s_churn: float, s_tmin: float, s_tmax: float,
              s_noise: float):
    """Karras et al. 2022, Algorithm 2, lines 5-7: raise the noise level to sigma_hat = sigma (1 + gamma).

    Returns (x at sigma_hat, sigma_hat); a no-op without churn.
    """
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


def randn_like(x: torch.Tensor, generator: rng.Generator) -> torch.Tensor:
    """Unit noise of x's shape drawn from `generator` (one, or a list with one per batch element) on its own
    device, as diffusers' `randn_tensor`."""
    return rng.randn_like(x, generator)


def gaussian_noise_sampler(x: torch.Tensor, generator: torch.Generator | None) -> NoiseSampler:
    """Independent unit noise for every call (k-diffusion's default noise sampler)."""
    return lambda sigma, sigma_next: randn_like(x, generator)


def log_midpoint(sigma_a, sigma_b):
    """The geometric mean of two sigmas: the midpoint in log-sigma (DPM-Solver's time variable)."""
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


class _Steps:
    """Iterates (i, sigma, sigma_next) over a sampler's steps; checks `interrupt`, reports to `callback`."""

    def __init__(self, sigmas: torch.Tensor, callback, interrupt):
        self.sigmas, self.callback, self.interrupt = sigmas, callback, interrupt
        self.total = len(sigmas) - 1
        self.denoised = None

    def __iter__(self):
        for i in range(self.total):
            yield i, self.sigmas[i], self.sigmas[i + 1]

    def report(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        self.denoised = denoised
        if self.callback is not None:
            self.callback({"step": i, "total": self.total, "sigma": self.sigmas[i],
                           "sigma_next": self.sigmas[i + 1], "x": x, "denoised": denoised})

    def check(self, i: int, x: torch.Tensor) -> None:
        if self.interrupt is not None and self.interrupt():
            raise SamplingInterrupted(i, x, self.denoised)


# --- first order ------------------------------------------------------------------------------------


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2)."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        x, sigma_hat = add_churn(x, sigma, steps.total, generator, s_churn=s_churn, s_tmin=s_tmin,
                                 s_tmax=s_tmax, s_noise=s_noise)
        denoised = denoiser(x, sigma_hat)
        steps.report(i, x, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


def _ancestral_sampler(denoiser, x, sigmas, generator, callback, interrupt, eta, s_noise):
    """Denoise, take a deterministic step to sigma_down, add fresh noise of std sigma_up."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if eta > 0 and sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=1.0,
                           s_noise=1.0):
    """Ancestral Euler sampling (k-diffusion): an Euler step to sigma_down, then noise of std sigma_up."""
    return _ancestral_sampler(denoiser, x, sigmas, generator, callback, interrupt, eta, s_noise)


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12).

    In sigma a DDIM step is x0 + sigma_next * eps, i.e. an Euler step; with eta > 0 it adds the noise of
    DDIM's sigma_t(eta), which is the ancestral step of `get_ancestral_step`.
    """
    return _ancestral_sampler(denoiser, x, sigmas, generator, callback, interrupt, eta, 1.0)


def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None):
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, "fixed_small").

    The posterior's mean and variance, written in sigma, are exactly the ancestral step with eta = 1.
    """
    return _ancestral_sampler(denoiser, x, sigmas, generator, callback, interrupt, 1.0, 1.0)


def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None,
               timestep_scaling=10.0, sigma_data=0.5):
    """Latent Consistency Model sampling (Luo et al. 2023, Algorithm 1): denoise, then re-noise to sigma_next.

    The consistency boundary condition f = c_skip(t) x_t + c_out(t) x0 needs the training timestep t of each
    sigma, taken from `denoiser.sigma_to_t` when the denoiser has one (sdlab's do); otherwise it is skipped
    (c_skip < 1e-5 for t >= 19, so the difference is negligible).
    """
    sigma_to_t = getattr(denoiser, "sigma_to_t", None)
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        if sigma_to_t is not None:
            t = sigma_to_t(sigma).double() * timestep_scaling
            c_skip, c_out = sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2) ** 0.5
            denoised = c_out.float() * denoised + c_skip.float() * x / (sigma**2 + 1) ** 0.5
        steps.report(i, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * randn_like(x, generator)
    return x


def sample_tcd(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=0.3,
               schedule: NoiseSchedule | None = None):
    """Trajectory Consistency Distillation's "strategic stochastic sampling" (Zheng et al. 2024, "Trajectory
    Consistency Distillation", arXiv:2402.19159), as diffusers' TCDScheduler (Hyper-SD and TCD LoRAs).

    Each step denoises at sigma (timestep t), follows the predicted trajectory down to an intermediate
    training timestep s = floor((1 - gamma) t_next) below the next one (x_s = x0 + sigma_s eps, DDIM's step),
    then adds fresh noise from sigma_s back up to sigma_next. gamma = 0 is deterministic (s = t_next: a
    DDIM-like consistency step); gamma = 1 re-noises from s = 0, i.e. from (almost) x0, as LCM does. The
    step onto the end of the schedule adds no noise (so one step adds none at all); that end is timestep 0,
    sigma_min, where diffusers' last step goes, so the registry's sigmas for TCD end there.

    eta is gamma: diffusers' pipelines pass their `eta` to TCDScheduler.step as gamma. Its default here is
    0.3, TCDScheduler.step's own default and the value of the TCD and Hyper-SD examples (which pass
    eta=0.3). diffusers' StableDiffusionPipeline itself defaults to eta=0.0, so a diffusers pipeline called
    without eta samples TCD with gamma = 0; sdlab's drop-in pipeline passes its eta the same way.

    schedule: the model's training noise schedule, for the sigma of the integer timestep s; by default the
    denoiser's `schedule` (sdlab's denoisers have one).
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ParameterError(f"eta={eta!r}: TCD's eta is its gamma, the fraction of each step re-noised; "
                             "give a number from 0 (deterministic) to 1")
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ValueError("sample_tcd needs the training noise schedule: pass schedule=NoiseSchedule(...) or a "
                         "denoiser with a `schedule` (sdlab.diffusion.denoisers)")
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)  # (B, C, h, w)
        steps.report(i, x, denoised)
        t_next = schedule.sigma_to_t(sigma_next)  # an integer on TCD's own timesteps; 0 at the end
        sigma_s = _tcd_intermediate_sigma(schedule, t_next, sigma_next, eta)
        x = denoised + sigma_s * to_d(x, sigma, denoised)  # the trajectory at s: x0 + sigma_s eps
        if eta > 0 and t_next > 0:
            # Forward diffusion from s to t_next: in VE the variances add, sigma_next^2 = sigma_s^2 + up^2.
            x = x + (sigma_next**2 - sigma_s**2).sqrt() * randn_like(x, generator)
    return x


def _tcd_intermediate_sigma(schedule: NoiseSchedule, t_next: torch.Tensor, sigma_next: torch.Tensor,
                            gamma: float) -> torch.Tensor:
    """The sigma of TCD's intermediate timestep s = floor((1 - gamma) t_next), never above sigma_next.

    diffusers computes s from its integer timestep in float32 ((1 - gamma) * a long tensor), as here. With
    gamma = 0, s is t_next: sigma_next itself, also on sigmas between training timesteps (e.g. Karras).
    """
    if gamma == 0:
        return sigma_next
    s = int(torch.floor((1 - gamma) * t_next.float()))
    return torch.minimum(schedule.sigmas[s].to(sigma_next), sigma_next)


# --- second order, single step -------------------------------------------------------------------------


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); an Euler step onto sigma = 0."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        x, sigma_hat = add_churn(x, sigma, steps.total, generator, s_churn=s_churn, s_tmin=s_tmin,
                                 s_tmax=s_tmax, s_noise=s_noise)
        denoised = denoiser(x, sigma_hat)
        steps.report(i, x, denoised)
        d, dt = to_d(x, sigma_hat, denoised), sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next))
        x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm_2(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in k-diffusion's form: a midpoint step in log-sigma."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        x, sigma_hat = add_churn(x, sigma, steps.total, generator, s_churn=s_churn, s_tmin=s_tmin,
                                 s_tmax=s_tmax, s_noise=s_noise)
        denoised = denoiser(x, sigma_hat)
        steps.report(i, x, denoised)
        x = _dpm_2_step(denoiser, x, sigma_hat, sigma_next, to_d(x, sigma_hat, denoised))
    return x


def _dpm_2_step(denoiser, x, sigma, sigma_to, d):
    """From sigma to sigma_to with the slope at the log-sigma midpoint (Euler when sigma_to = 0)."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = log_midpoint(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=1.0,
                           s_noise=1.0):
    """Ancestral DPM-Solver-2 (k-diffusion): a DPM-2 step to sigma_down, then noise of std sigma_up."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = _dpm_2_step(denoiser, x, sigma, sigma_down, to_d(x, sigma, denoised))
        if sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None,
                              eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b, "DPM-Solver++", Algorithm 1, r = 1/2; k-diffusion)."""
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            # A first-order step to the log-sigma midpoint, then the full step with the slope there.
            sigma_mid = log_midpoint(sigma, sigma_down)
            x_2 = _dpmpp_first_order(x, sigma, sigma_mid, denoised)
            x = _dpmpp_first_order(x, sigma, sigma_down, denoiser(x_2, sigma_mid))
        if sigma_next > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def _dpmpp_first_order(x, sigma, sigma_to, denoised):
    """The exact solution of the ODE from sigma to sigma_to for a constant x0 estimate (DDIM's step, in
    DPM-Solver++'s exponential-integrator form): x0 + (sigma_to / sigma) (x - x0)."""
    return (sigma_to / sigma) * x - torch.expm1(sigma_to.log() - sigma.log()) * denoised


def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=1.0,
                     s_noise=1.0, noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++ (stochastic, 2nd order, r = 1/2), k-diffusion's `sample_dpmpp_sde` (Lu et al. 2022b).

    Two network calls per step, each followed by an ancestral noise draw. The reference draws from a
    Brownian tree (torchsde); by default sdlab draws independent unit noise from `generator`. Times are
    t = -log(sigma) as in the reference, so a Brownian tree sees bit-identical query points.
    """
    noise_sampler = noise_sampler or gaussian_noise_sampler(x, generator)
    steps = _Steps(sigmas, callback, interrupt)
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = -sigma.log(), -sigma_next.log()
        sigma, sigma_mid, sigma_next = (-t).exp(), (-(t + (t_next - t) / 2)).exp(), (-t_next).exp()
        x_2 = _sde_substep(x, sigma, sigma_mid, denoised, eta, s_noise, noise_sampler)
        x = _sde_substep(x, sigma, sigma_next, denoiser(x_2, sigma_mid), eta, s_noise, noise_sampler)
    return x


def _sde_substep(x, sigma, sigma_to, denoised, eta, s_noise, noise_sampler):
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_to, eta)
    x = _dpmpp_first_order(x, sigma, sigma_down, denoised)
    return x + noise_sampler(sigma, sigma_to) * s_noise * sigma_up


# --- multistep -------------------------------------------------------------------------------------------


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): second-order multistep in log-sigma, x0 prediction.

    The first step and the step onto sigma = 0 are first order (diffusers' lower_order_final).
    """
    steps = _Steps(sigmas, callback, interrupt)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        x = _dpmpp_first_order(x, sigma, sigma_next, _extrapolate(denoised, old_denoised, h, h_last))
        old_denoised, h_last = denoised, h
    return x


def _extrapolate(denoised, old_denoised, h, h_last):
    """DPM-Solver++(2M)'s corrected x0 estimate: denoised + (denoised - old_denoised) / (2 r), r = h_last / h."""
    if old_denoised is None:
        return denoised
    r = h_last / h
    return (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, eta=1.0,
                        s_noise=1.0, noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, section 4; diffusers' "sde-dpmsolver++", midpoint solver).

    One network call and one noise draw per step; first order on the first step and onto sigma = 0.
    """
    noise_sampler = noise_sampler or gaussian_noise_sampler(x, generator)
    steps = _Steps(sigmas, callback, interrupt)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        decay = -torch.expm1(-h - eta_h)  # 1 - exp(-2h) for eta = 1
        x = (sigma_next / sigma) * torch.exp(-eta_h) * x + decay * denoised
        if old_denoised is not None:
            x = x + 0.5 * decay * (h / h_last) * (denoised - old_denoised)
        x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i - j]."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d([1.0])
    for node in nodes:
        basis = basis * np.poly1d([1.0, -node]) / (sigmas[i - j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, order=4):
    """Linear multistep (Adams-Bashforth on non-uniform sigmas, k-diffusion; Karras et al. 2022 sec. 3)."""
    nodes = sigmas.detach().cpu().double().numpy()
    steps = _Steps(sigmas, callback, interrupt)
    ds = []
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        current = len(ds)
        for j, d in enumerate(reversed(ds)):
            x = x + lms_coefficient(nodes, i, j, current) * d
    return x


# Adams-Bashforth coefficients for equal steps, newest slope first.
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_plms(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None):
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", PLMS).

    Fourth-order Adams-Bashforth on eps = dx/dsigma with the coefficients of equal steps, applied through
    the DDIM transfer (an Euler step in sigma). Like diffusers' PNDMScheduler(skip_prk_steps=True), the
    first step is an improved Euler (Heun) step in place of the paper's Runge-Kutta warm-up.
    """
    steps = _Steps(sigmas, callback, interrupt)
    ds = []
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        d, dt = to_d(x, sigma, denoised), sigma_next - sigma
        if not ds and sigma_next > 0:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next))
            x, ds = x + (d + d_2) / 2 * dt, [d]
            continue
        ds = (ds + [d])[-4:]
        slope = sum(c * d_k for c, d_k in zip(_ADAMS_BASHFORTH[len(ds)], reversed(ds)))
        x = x + slope * dt
    return x


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, interrupt=None, order=2,
                 variant="bh2"):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction.

    Each step corrects the previous prediction with UniC using the new network output, then predicts the
    next sample with UniP of up to `order`, lowered during warm-up and on the last steps (diffusers'
    lower_order_final). variant: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).
    """
    steps = _Steps(sigmas, callback, interrupt)
    history = []  # (lambda = -log sigma, x0 estimate) of recent steps, newest last
    last_x, last_order = None, 0
    for i, sigma, sigma_next in steps:
        steps.check(i, x)
        denoised = denoiser(x, sigma)
        steps.report(i, x, denoised)
        lam = -sigma.double().log()
        if history:
            x = _unipc_update(last_x, history, lam, last_order, variant, model_t=denoised)
        history = (history + [(lam, denoised)])[-order:]
        last_x, last_order = x, min(order, steps.total - i, len(history))
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, history, -sigma_next.double().log(), last_order, variant)
    return x


def _unipc_update(x, history, lambda_t, order, variant, model_t=None):
    """UniP (model_t None) or UniC from history[-1]'s time to lambda_t (Zhao et al. 2023, Algorithms 1-2)."""
    lambda_0, m0 = history[-1]
    h = lambda_t - lambda_0
    rks = [(history[-(k + 1)][0] - lambda_0) / h for k in range(1, order)]
    D1s = [(history[-(k + 1)][1] - m0) / float(rk) for k, rk in zip(range(1, order), rks)]
    R, b, h_phi_1, B_h = _unipc_system(rks + [torch.ones((), dtype=torch.float64)], h, order, variant)
    x_t = torch.exp(-h).float() * x - h_phi_1.float() * m0  # sigma_t / sigma_0 = exp(-h)
    if model_t is None:  # predictor
        if not D1s:
            return x_t
        rhos = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - B_h.float() * _weighted(rhos, D1s)
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
    correction = _weighted(rhos[:-1], D1s) + rhos[-1].float() * (model_t - m0)
    return x_t - B_h.float() * correction


def _weighted(weights, tensors):
    """sum_k weights[k] * tensors[k] (0 for none)."""
    return sum(float(w) * t for w, t in zip(weights, tensors))


def _unipc_system(rks, h, order, variant):
    """The linear system R rho = b of UniPC's B(h) variants, and the phi_1 term (float64)."""
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    rks = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rks])
    R, b, factorial = [], [], 1
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(R), torch.stack(b), h_phi_1, B_h
