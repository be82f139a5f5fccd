"""Noise schedules against diffusers' schedulers: betas, zero-SNR rescale, spacings, Karras, exponential."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference_rescale

from sdlab.config import ScheduleConfig
from sdlab.diffusion.schedules import (
    NoiseSchedule,
    betas_from_config,
    make_sigmas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
    ve_to_vp,
)
from sdlab.errors import ParameterError

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "steps_offset": 1}
CONFIG = ScheduleConfig()


def _diffusers(name, steps, **options):
    scheduler = getattr(diffusers, name)(**{**SD, **options})
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_training_schedule_matches_diffusers(beta_schedule):
    config = ScheduleConfig(beta_schedule=beta_schedule)
    reference = diffusers.DDPMScheduler(**{**SD, "beta_schedule": beta_schedule})
    torch.testing.assert_close(betas_from_config(config), reference.betas, rtol=0, atol=0)
    torch.testing.assert_close(NoiseSchedule.from_config(config).alphas_cumprod, reference.alphas_cumprod)


def test_zero_terminal_snr_rescale_matches_diffusers():
    betas = betas_from_config(CONFIG)
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), reference_rescale(betas))
    schedule = NoiseSchedule.from_config(CONFIG, zero_terminal_snr=True)
    assert schedule.sigma_max == pytest.approx(4096, rel=1e-3)  # alphas_cumprod[-1] = 2^-24, as diffusers
    reference = _diffusers("EulerDiscreteScheduler", 10, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ours = make_sigmas(CONFIG, 10, spacing="trailing", zero_terminal_snr=True)
    torch.testing.assert_close(ours, reference.sigmas, rtol=1e-5, atol=0)


def test_sigmas_of_the_table():
    schedule = NoiseSchedule.from_config(CONFIG)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)
    a = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.sigmas, ((1 - a) / a).sqrt())


# (sdlab style, diffusers scheduler whose sigmas it reproduces)
FAMILIES = [("k", "EulerDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler")]


@pytest.mark.parametrize("steps", [2, 7, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("style, scheduler", FAMILIES)
def test_spaced_sigmas_match_diffusers(style, scheduler, spacing, steps):
    reference = _diffusers(scheduler, steps, timestep_spacing=spacing)
    ours = make_sigmas(CONFIG, steps, "automatic", spacing, style=style)
    torch.testing.assert_close(ours, reference.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule, option", [("karras", "use_karras_sigmas"),
                                              ("exponential", "use_exponential_sigmas")])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("style, scheduler", FAMILIES)
def test_karras_and_exponential_match_diffusers(style, scheduler, spacing, schedule, option):
    reference = _diffusers(scheduler, 15, timestep_spacing=spacing, **{option: True})
    ours = make_sigmas(CONFIG, 15, schedule, spacing, style=style)
    torch.testing.assert_close(ours, reference.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DDPMScheduler"])
def test_ddim_family_timesteps_match_diffusers(scheduler, spacing):
    reference = _diffusers(scheduler, 20, timestep_spacing=spacing)
    ours = spaced_timesteps(1000, 20, spacing, style="ddim")
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())


def test_lcm_timesteps_match_diffusers():
    for steps in (1, 4, 8):
        reference = _diffusers("LCMScheduler", steps)
        np.testing.assert_array_equal(spaced_timesteps(1000, steps, style="lcm"), reference.timesteps.numpy())


def test_sigma_to_t_inverts_the_table_and_interpolates_in_log_sigma():
    schedule = NoiseSchedule.from_config(CONFIG)
    t = torch.tensor([0.0, 1.0, 500.0, 951.0, 999.0])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas[t.long()]), t, atol=1e-3, rtol=0)
    mid = (schedule.sigmas[10] * schedule.sigmas[11]).sqrt()  # log-sigma midpoint of timesteps 10 and 11
    assert schedule.sigma_to_t(mid).item() == pytest.approx(10.5, abs=1e-4)
    assert schedule.sigma_to_t(mid, quantize=True).item() in (10.0, 11.0)
    torch.testing.assert_close(schedule.t_to_sigma(torch.tensor([10.5])), mid.reshape(1), rtol=1e-6, atol=0)


def test_sigma_to_t_matches_diffusers_on_karras_sigmas():
    reference = _diffusers("EulerDiscreteScheduler", 12, use_karras_sigmas=True)
    schedule = NoiseSchedule.from_config(CONFIG)
    ours = schedule.sigma_to_t(reference.sigmas[:-1])
    torch.testing.assert_close(ours, reference.timesteps, atol=2e-3, rtol=0)


def test_uniform_schedules_span_the_table():
    schedule = NoiseSchedule.from_config(CONFIG)
    for name, first_t in (("uniform", 999), ("sgm_uniform", 999), ("simple", 999)):
        sigmas = make_sigmas(CONFIG, 10, name)
        assert sigmas.shape == (11,) and sigmas[-1] == 0
        assert sigmas[0].item() == pytest.approx(schedule.sigmas[first_t].item(), rel=1e-5)
        assert torch.all(sigmas[:-1] > sigmas[1:])
    assert make_sigmas(CONFIG, 10, "uniform")[-2].item() == pytest.approx(schedule.sigma_min, rel=1e-5)


def test_final_sigma_and_ve_to_vp():
    sigmas = make_sigmas(CONFIG, 10, final_sigma="sigma_min", style="ddim")
    assert sigmas[-1].item() == pytest.approx(NoiseSchedule.from_config(CONFIG).sigma_min)
    x = torch.full((1, 4, 2, 2), 2.0)
    torch.testing.assert_close(ve_to_vp(x, 0.0), x)
    torch.testing.assert_close(ve_to_vp(x, 3.0), x / 10**0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"),
    ({"steps": 10, "schedule": "fancy"}, "schedule 'fancy'.*karras"),
    ({"steps": 10, "spacing": "sideways"}, "spacing 'sideways'.*leading"),
    ({"steps": 10, "style": "z"}, "timestep style"),
    ({"steps": 10, "final_sigma": "one"}, "final_sigma"),
])
def test_bad_input_raises_parameter_error(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        make_sigmas(CONFIG, **kwargs)


def test_unknown_beta_schedule():
    with pytest.raises(ParameterError, match="beta_schedule"):
        betas_from_config(ScheduleConfig(beta_schedule="cosine"))
