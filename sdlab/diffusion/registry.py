"""The one table of samplers: public names (A1111 labels and k-diffusion names) -> `SamplerSpec`.

The CLI, the API and the server all read `SAMPLERS` / `get_sampler`. The schedule ("Schedule type") is
chosen separately: `spec.make_sigmas(schedule_config, steps, schedule="karras", spacing="leading")`.

Each sampler reproduces a diffusers scheduler (tests/test_samplers.py checks final latents to 1e-4 on a toy
network, with Stable Diffusion's scheduler config: beta_schedule="scaled_linear", 0.00085..0.012,
timestep_spacing="leading", steps_offset=1, plus the options below):

| A1111 label   | key                   | diffusers scheduler and options                                       |
|---------------|-----------------------|-----------------------------------------------------------------------|
| Euler         | euler                 | EulerDiscreteScheduler                                                |
| Euler a       | euler_ancestral       | EulerAncestralDiscreteScheduler                                       |
| Heun          | heun                  | HeunDiscreteScheduler                                                 |
| LMS           | lms                   | LMSDiscreteScheduler                                                  |
| DPM2          | dpm_2                 | KDPM2DiscreteScheduler                                                |
| DPM2 a        | dpm_2_ancestral       | KDPM2AncestralDiscreteScheduler                                       |
| DPM++ 2S a    | dpmpp_2s_ancestral    | none (k-diffusion only; tested on an analytic denoiser)               |
| DPM++ 2M      | dpmpp_2m              | DPMSolverMultistepScheduler (dpmsolver++, midpoint, order 2)          |
| DPM++ SDE     | dpmpp_sde             | DPMSolverSDEScheduler (pass its Brownian tree as noise_sampler)      |
| DPM++ 2M SDE  | dpmpp_2m_sde          | DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")        |
| DDIM          | ddim                  | DDIMScheduler (set_alpha_to_one=False: sigmas end at sigma_min)       |
| PLMS          | plms                  | PNDMScheduler(skip_prk_steps=True) (ends at sigma_min likewise)      |
| DDPM          | ddpm                  | DDPMScheduler (variance_type="fixed_small")                           |
| UniPC         | uni_pc                | UniPCMultistepScheduler (bh2, order 2, predict_x0)                    |
| LCM           | lcm                   | LCMScheduler (original_inference_steps=50, timestep_scaling=10)       |
| TCD           | tcd                   | TCDScheduler (original_inference_steps=50; gamma = eta, default 0.3)  |

"Karras" schedule = the scheduler's use_karras_sigmas=True, "exponential" = use_exponential_sigmas=True.
For DPM++ 2M (SDE) and UniPC diffusers feeds the network rounded timesteps on Karras sigmas: build their
denoiser with `quantize=spec.quantize(schedule)` for parity. (On exponential sigmas it truncates them
with an int64 cast, so that 14.6146 -> 998.99999 -> 998; sdlab feeds the fractional timestep there.) Samplers with final_sigma="sigma_min" return
x = x0 + sigma_min * eps; `schedules.ve_to_vp(x, sigmas[-1])` is diffusers' latent.
The initial latent is `noise * spec.initial_noise_scale(sigmas, spacing)` (diffusers' init_noise_sigma in
sdlab's VE units).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdlab.config import ScheduleConfig
from sdlab.diffusion import samplers as S
from sdlab.diffusion.schedules import FinalSigma, NoiseSchedule, Spacing, TimestepStyle, make_sigmas
from sdlab.errors import ParameterError


@dataclass(frozen=True)
class SamplerSpec:
    """A public sampler: its function and the conventions (from diffusers) that choose its sigmas.

    style: which diffusers scheduler family's timestep spacing "automatic" uses (see `schedules`).
    quantize_karras: diffusers' multistep solvers feed the network rounded timesteps on Karras sigmas.
    final_sigma: where the sigmas end ("zero", or "sigma_min" for DDIM/PLMS as SD configures them).
    evaluations: network evaluations per step (2 for the second-order single-step samplers), for costing.
    """

    label: str
    key: str
    sample: Callable
    style: TimestepStyle = "k"
    quantize_karras: bool = False
    final_sigma: FinalSigma = "zero"
    stochastic: bool = False
    evaluations: int = 1
    reference: str = ""
    aliases: tuple[str, ...] = field(default=())

    def make_sigmas(self, schedule_config: ScheduleConfig | NoiseSchedule, steps: int,
                    schedule: str = "automatic", spacing: Spacing = "leading", **options) -> torch.Tensor:
        options.setdefault("final_sigma", self.final_sigma)
        return make_sigmas(schedule_config, steps, schedule, spacing, style=self.style, **options)

    def quantize(self, schedule: str) -> bool:
        """Whether the denoiser should round timesteps (`ModelDenoiser(quantize=...)`) for diffusers parity."""
        return self.quantize_karras and schedule == "karras"

    def initial_noise_scale(self, sigmas: torch.Tensor, spacing: Spacing = "leading") -> float:
        """diffusers' init_noise_sigma in VE units: sqrt(sigma_max^2 + 1), except that its k-diffusion ports
        use sigma_max itself with "linspace" and "trailing" spacing."""
        sigma_max = float(sigmas[0])
        if self.style == "k" and spacing in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max**2 + 1)


_SPECS = (
    SamplerSpec("Euler", "euler", S.sample_euler, reference="EulerDiscreteScheduler"),
    SamplerSpec("Euler a", "euler_ancestral", S.sample_euler_ancestral, stochastic=True,
                reference="EulerAncestralDiscreteScheduler", aliases=("euler_a",)),
    SamplerSpec("Heun", "heun", S.sample_heun, evaluations=2, reference="HeunDiscreteScheduler"),
    SamplerSpec("LMS", "lms", S.sample_lms, reference="LMSDiscreteScheduler"),
    SamplerSpec("DPM2", "dpm_2", S.sample_dpm_2, evaluations=2, reference="KDPM2DiscreteScheduler"),
    SamplerSpec("DPM2 a", "dpm_2_ancestral", S.sample_dpm_2_ancestral, stochastic=True, evaluations=2,
                reference="KDPM2AncestralDiscreteScheduler"),
    SamplerSpec("DPM++ 2S a", "dpmpp_2s_ancestral", S.sample_dpmpp_2s_ancestral, stochastic=True,
                evaluations=2),
    SamplerSpec("DPM++ 2M", "dpmpp_2m", S.sample_dpmpp_2m, style="dpm", quantize_karras=True,
                reference="DPMSolverMultistepScheduler"),
    SamplerSpec("DPM++ SDE", "dpmpp_sde", S.sample_dpmpp_sde, stochastic=True, evaluations=2,
                reference="DPMSolverSDEScheduler"),
    SamplerSpec("DPM++ 2M SDE", "dpmpp_2m_sde", S.sample_dpmpp_2m_sde, style="dpm", quantize_karras=True,
                stochastic=True, reference='DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")'),
    SamplerSpec("DDIM", "ddim", S.sample_ddim, style="ddim", final_sigma="sigma_min",
                reference="DDIMScheduler"),
    SamplerSpec("PLMS", "plms", S.sample_plms, style="ddim", final_sigma="sigma_min",
                reference="PNDMScheduler(skip_prk_steps=True)", aliases=("pndm",)),
    SamplerSpec("DDPM", "ddpm", S.sample_ddpm, style="ddim", stochastic=True, reference="DDPMScheduler"),
    SamplerSpec("UniPC", "uni_pc", S.sample_unipc, style="dpm", quantize_karras=True,
                reference="UniPCMultistepScheduler", aliases=("unipc",)),
    SamplerSpec("LCM", "lcm", S.sample_lcm, style="lcm", stochastic=True, reference="LCMScheduler"),
    # TCD picks LCM's timesteps; diffusers' last step goes to timestep 0 (sigma_min), not to sigma 0.
    SamplerSpec("TCD", "tcd", S.sample_tcd, style="lcm", final_sigma="sigma_min", stochastic=True,
                reference="TCDScheduler"),
)


def _normalize(name: str) -> str:
    return " ".join(name.strip().lower().split())


SAMPLERS: dict[str, SamplerSpec] = {
    _normalize(name): spec for spec in _SPECS for name in (spec.label, spec.key, *spec.aliases)
}


def sampler_names() -> list[str]:
    """The A1111 labels, in menu order."""
    return [spec.label for spec in _SPECS]


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called `name` (an A1111 label or a k-diffusion name, any case)."""
    spec = SAMPLERS.get(_normalize(name)) if isinstance(name, str) else None
    if spec is None:
        valid = ", ".join(f"{s.label!r} ({s.key})" for s in _SPECS)
        raise ParameterError(f"unknown sampler {name!r}; valid samplers: {valid}")
    return spec


def with_options(spec: SamplerSpec, **options) -> SamplerSpec:
    """The same sampler with different default options (e.g. eta=0.5 for DDIM, order=3 for UniPC)."""
    from dataclasses import replace
    return replace(spec, sample=functools.partial(spec.sample, **options))
