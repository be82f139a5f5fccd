"""Samplers: parity with diffusers' schedulers on a toy network, and convergence on an analytic denoiser.

Parity: diffusers' own loop (set_timesteps, scale_model_input, step with a generator) around a small fixed
network that depends on x, t and the context, against sdlab's sampler around the same network through
sdlab's denoiser, both from the same seed. Final latents must agree to 1e-4 relative.

Known, documented differences from diffusers (not tested for parity, see the tests at the end):
- PLMS on v-prediction models: diffusers combines the raw v outputs of different steps; sdlab (and the PNDM
  paper) combine eps = dx/dsigma. Checked: sdlab's PLMS on a v-model equals diffusers on the equivalent
  eps-model.
- DDIM/PLMS with "linspace" spacing, or "trailing" when steps does not divide 1000: diffusers steps to
  t - 1000 // steps, which is not the next timestep of its own schedule; no sigma schedule can express it.
- DPM2 (a) on Karras sigmas: diffusers rounds the timesteps of the main steps but not of the midpoints.
- DPM++ 2M / UniPC on exponential sigmas: diffusers truncates the timesteps with an int64 cast.
"""

import inspect
import math

import diffusers
import pytest
import torch

from sdlab.config import ScheduleConfig
from sdlab.diffusion import samplers as S
from sdlab.diffusion.conditioning import Conditioning
from sdlab.diffusion.denoisers import GuidedDenoiser, ModelDenoiser
from sdlab.diffusion.registry import SAMPLERS, get_sampler, sampler_names, with_options
from sdlab.diffusion.schedules import NoiseSchedule, karras_sigmas, ve_to_vp
from sdlab.errors import ParameterError

# Stable Diffusion's scheduler config (v1-5 scheduler_config.json).
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                    "steps_offset": 1, "timestep_spacing": "leading"}
SHAPE = (1, 4, 8, 8)


class ToyNet(torch.nn.Module):
    """A fixed random conv whose output depends smoothly on x, the timestep and the context."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.2)

    def forward(self, x, t, context):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        scale = (1 + 0.5 * torch.sin(t / 150))[:, None, None, None]
        shift = (0.1 * torch.cos(t / 90))[:, None, None, None]
        c = context.mean(dim=(1, 2))[:, None, None, None]
        return torch.tanh(torch.nn.functional.conv2d(x, self.weight, padding=1)) * scale + shift + 0.1 * c


CONTEXT = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def run_diffusers(scheduler_name, steps, *, prediction="epsilon", seed=0, net=None, **options):
    net = net or ToyNet()
    scheduler = getattr(diffusers, scheduler_name)(**{**SD_SCHEDULER, "prediction_type": prediction, **options})
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if takes_generator else {}
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t, CONTEXT), t, x, **kwargs).prev_sample
    return x


@torch.no_grad()
def run_sdlab(name, steps, *, prediction="epsilon", seed=0, schedule="automatic", spacing="leading",
              noise_sampler=None):
    spec = get_sampler(name)
    sigmas = spec.make_sigmas(ScheduleConfig(), steps, schedule, spacing)
    model = ModelDenoiser(ToyNet(), NoiseSchedule.from_config(ScheduleConfig()), prediction,
                          quantize=spec.quantize(schedule))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * spec.initial_noise_scale(sigmas, spacing)
    extra = {"noise_sampler": noise_sampler} if noise_sampler is not None else {}
    x = spec.sample(GuidedDenoiser(model, Conditioning(CONTEXT)), x, sigmas, generator=generator, **extra)
    return ve_to_vp(x, sigmas[-1])


def assert_close(ours, theirs, rtol=1e-4):
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < rtol, f"max abs diff relative to scale: {err:.2e}"


# A1111 label -> (diffusers scheduler, its options). The table in sdlab.diffusion.registry documents the same.
PAIRS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "DDPM": ("DDPMScheduler", {"clip_sample": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {"clip_sample": False}),
}
KARRAS = ("Euler", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "UniPC")
EXPONENTIAL = ("Euler", "Heun", "LMS", "DPM2", "DPM2 a")


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize("name", list(PAIRS))
def test_matches_diffusers_eps(name, steps):
    scheduler, options = PAIRS[name]
    assert_close(run_sdlab(name, steps), run_diffusers(scheduler, steps, **options))


@pytest.mark.parametrize("name", [n for n in PAIRS if n != "PLMS"])
def test_matches_diffusers_v_prediction(name):
    scheduler, options = PAIRS[name]
    assert_close(run_sdlab(name, 20, prediction="v_prediction"),
                 run_diffusers(scheduler, 20, prediction="v_prediction", **options))


@pytest.mark.parametrize("name", KARRAS)
def test_matches_diffusers_karras(name, steps=12):
    scheduler, options = PAIRS[name]
    ours = run_sdlab(name, steps, schedule="karras", prediction="v_prediction")
    assert_close(ours, run_diffusers(scheduler, steps, use_karras_sigmas=True, prediction="v_prediction",
                                     **options))


@pytest.mark.parametrize("name", EXPONENTIAL)
def test_matches_diffusers_exponential(name):
    scheduler, options = PAIRS[name]
    assert_close(run_sdlab(name, 9, schedule="exponential"),
                 run_diffusers(scheduler, 9, use_exponential_sigmas=True, **options))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DDPM"])
def test_matches_diffusers_spacings(name, spacing):
    scheduler, options = PAIRS[name]
    assert_close(run_sdlab(name, 10, spacing=spacing),
                 run_diffusers(scheduler, 10, timestep_spacing=spacing, **options))


@pytest.mark.parametrize("name", ["DDIM", "PLMS"])
def test_ddim_family_trailing_matches_when_steps_divide(name):
    scheduler, options = PAIRS[name]
    assert_close(run_sdlab(name, 25, spacing="trailing"),
                 run_diffusers(scheduler, 25, timestep_spacing="trailing", **options))


def test_ddim_with_eta_matches_diffusers():
    ddim = with_options(get_sampler("DDIM"), eta=0.7)
    sigmas = ddim.make_sigmas(ScheduleConfig(), 10)
    model = ModelDenoiser(ToyNet(), NoiseSchedule.from_config(ScheduleConfig()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * ddim.initial_noise_scale(sigmas)
    with torch.no_grad():
        ours = ve_to_vp(ddim.sample(GuidedDenoiser(model, Conditioning(CONTEXT)), x, sigmas, generator=g), sigmas[-1])
    # diffusers' DDIM takes eta per step.
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            y = scheduler.step(ToyNet()(y, t, CONTEXT), t, y, eta=0.7, generator=g).prev_sample
    assert_close(ours, y)


@pytest.mark.parametrize("schedule, prediction", [("automatic", "epsilon"), ("karras", "v_prediction")])
def test_dpmpp_sde_matches_diffusers_with_its_brownian_tree(schedule, prediction):
    pytest.importorskip("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    spec = get_sampler("DPM++ SDE")
    sigmas = spec.make_sigmas(ScheduleConfig(), 12, schedule)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * spec.initial_noise_scale(sigmas)
    tree = BrownianTreeNoiseSampler(x_T, sigmas[sigmas > 0].min().item(), sigmas.max().item(), 42)
    ours = run_sdlab("DPM++ SDE", 12, schedule=schedule, prediction=prediction, noise_sampler=tree)
    theirs = run_diffusers("DPMSolverSDEScheduler", 12, prediction=prediction, noise_sampler_seed=42,
                           use_karras_sigmas=schedule == "karras")
    assert_close(ours, theirs)


def test_plms_on_v_model_follows_the_paper():
    """diffusers' PNDM mixes raw v outputs; sdlab mixes eps, i.e. matches diffusers on the eps-model that
    has the same denoiser (eps = sqrt(a) v + sqrt(1 - a) x_t)."""
    alphas_cumprod = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    v_net = ToyNet()

    def eps_net(x_in, t, context):
        a = alphas_cumprod[torch.as_tensor(t).long()]
        return a.sqrt() * v_net(x_in, t, context) + (1 - a).sqrt() * x_in

    theirs = run_diffusers("PNDMScheduler", 20, net=eps_net, **PAIRS["PLMS"][1])
    assert_close(run_sdlab("PLMS", 20, prediction="v_prediction"), theirs)


# --- the analytic Gaussian denoiser --------------------------------------------------------------------

MU, STD = 0.7, 0.5


def gaussian_denoiser(x, sigma):
    """The exact D(x, sigma) = E[x0 | x] for data x0 ~ N(MU, STD^2 I)."""
    return (STD**2 * x + sigma**2 * MU) / (STD**2 + sigma**2)


def exact_ode_solution(x, sigma_from, sigma_to):
    """The probability-flow ODE moves x - MU proportionally to sqrt(STD^2 + sigma^2)."""
    return MU + (x - MU) * math.sqrt(STD**2 + sigma_to**2) / math.sqrt(STD**2 + sigma_from**2)


# Deterministic samplers and the error ratio when the steps double (1/2 first order, 1/4 second order).
ORDERS = {"Euler": 0.6, "DDIM": 0.6, "Heun": 0.3, "DPM2": 0.3, "DPM++ 2M": 0.3, "PLMS": 0.3, "LMS": 0.15,
          "UniPC": 0.15}


@pytest.mark.parametrize("name", list(ORDERS))
def test_deterministic_samplers_converge_with_their_order(name):
    sigma_min, sigma_max = 0.05, 14.6  # end above 0 so that every step is a regular step
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    exact = exact_ode_solution(x_T, sigma_max, sigma_min)
    errors = []
    for steps in (16, 32, 64):
        sigmas = karras_sigmas(sigma_min, sigma_max, steps + 1)
        errors.append((get_sampler(name).sample(gaussian_denoiser, x_T, sigmas) - exact).abs().max().item())
    assert errors[1] < errors[0] and errors[2] / errors[1] < ORDERS[name], errors


STOCHASTIC = ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DDPM"]


def _sample_gaussian(name, steps, **options):
    sigmas = torch.cat([karras_sigmas(0.02, 14.6, steps).float(), torch.zeros(1)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 64, 64, generator=g) * math.sqrt(14.6**2 + 1)
    return get_sampler(name).sample(gaussian_denoiser, x, sigmas, generator=g, **options)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_sample_the_data_distribution(name):
    coarse, fine = _sample_gaussian(name, 5), _sample_gaussian(name, 100)
    assert abs(fine.mean().item() - MU) < 0.015
    assert abs(fine.std().item() - STD) < 0.025
    assert abs(fine.std().item() - STD) < abs(coarse.std().item() - STD)


def test_euler_with_churn_still_samples_the_data_distribution():
    # Churn trades ODE accuracy for fresh noise: first order in the step size, so allow a wider margin.
    coarse, fine = _sample_gaussian("Euler", 25, s_churn=5.0), _sample_gaussian("Euler", 100, s_churn=5.0)
    assert abs(fine.mean().item() - MU) < 0.015 and abs(fine.std().item() - STD) < 0.04
    assert abs(fine.std().item() - STD) < abs(coarse.std().item() - STD)


def test_dpmpp_2s_ancestral_with_eta_0_is_a_converging_ode_solver():
    sigmas = karras_sigmas(0.05, 14.6, 33)
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    x = S.sample_dpmpp_2s_ancestral(gaussian_denoiser, x_T, sigmas, eta=0.0)
    assert (x - exact_ode_solution(x_T, 14.6, 0.05)).abs().max() < 0.01


# --- loop mechanics ------------------------------------------------------------------------------------


def test_randomness_comes_only_from_the_generator():
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        results.append(_sample_gaussian("Euler a", 8))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)) * 14.6
    other = get_sampler("Euler a").sample(gaussian_denoiser, x, karras_sigmas(0.02, 14.6, 8), generator=g)
    assert not torch.allclose(other, results[0])


def test_callback_reports_every_step():
    seen = []
    sigmas = torch.cat([karras_sigmas(0.02, 14.6, 6).float(), torch.zeros(1)])
    x = torch.randn(1, 4, 8, 8) * 14.6
    S.sample_heun(gaussian_denoiser, x, sigmas, callback=seen.append)
    assert [info["step"] for info in seen] == list(range(6))
    assert all(info["total"] == 6 for info in seen)
    assert set(seen[0]) == {"step", "total", "sigma", "sigma_next", "x", "denoised"}
    torch.testing.assert_close(seen[0]["denoised"], gaussian_denoiser(x, sigmas[0]))
    assert seen[-1]["sigma"] == sigmas[-2]


def test_interrupt_raises_with_the_last_preview():
    calls = []
    sigmas = torch.cat([karras_sigmas(0.02, 14.6, 10).float(), torch.zeros(1)])
    with pytest.raises(S.SamplingInterrupted) as caught:
        S.sample_dpmpp_2m(gaussian_denoiser, torch.randn(1, 4, 8, 8) * 14.6, sigmas,
                          callback=calls.append, interrupt=lambda: len(calls) == 3)
    assert caught.value.step == 3
    assert caught.value.denoised is calls[-1]["denoised"]


def test_lms_coefficients_integrate_polynomials_exactly():
    # With nodes 3, 2, 1 and the step 1 -> 0.5, the order-3 rule integrates any quadratic exactly.
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.5]).double().numpy()
    f = lambda s: s**2 - 2 * s + 3
    coeffs = [S.lms_coefficient(sigmas, 2, j, 3) for j in range(3)]
    approx = sum(c * f(sigmas[2 - j]) for j, c in enumerate(coeffs))
    exact = (0.5**3 / 3 - 0.5**2 + 1.5) - (1 / 3 - 1 + 3)
    assert approx == pytest.approx(exact, abs=1e-12)


def test_ancestral_step_splits_the_variance():
    down, up = S.get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=1.0)
    assert (down**2 + up**2).item() == pytest.approx(1.0)
    assert up.item() == pytest.approx(math.sqrt(3) / 2)
    down, up = S.get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=0.0)
    assert down.item() == 1.0 and up.item() == 0.0


# --- the registry ----------------------------------------------------------------------------------------

# A1111 label -> k-diffusion name
NAMES = {"Euler a": "euler_ancestral", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde",
         "DPM++ SDE": "dpmpp_sde", "DPM++ 2S a": "dpmpp_2s_ancestral", "Euler": "euler", "Heun": "heun",
         "LMS": "lms", "DPM2": "dpm_2", "DPM2 a": "dpm_2_ancestral", "DDIM": "ddim", "PLMS": "plms",
         "UniPC": "uni_pc", "LCM": "lcm", "TCD": "tcd", "DDPM": "ddpm"}


def test_registry_knows_a1111_labels_and_k_diffusion_names():
    assert sorted(sampler_names()) == sorted(NAMES)
    for label, key in NAMES.items():
        assert get_sampler(label) is get_sampler(key) is get_sampler(label.upper())
        assert get_sampler(label).label == label and get_sampler(label).key == key
    assert get_sampler("dpm++ 2m") is get_sampler("DPM++ 2M") is get_sampler("  DPMPP_2M ")
    assert all(callable(spec.sample) for spec in SAMPLERS.values())


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ParameterError, match="DPM\\+\\+ 2M.*dpmpp_2m"):
        get_sampler("DPM++ 9000")


def test_spec_sigmas_follow_its_family():
    config = ScheduleConfig()
    assert get_sampler("DDIM").make_sigmas(config, 10)[-1] > 0  # SD's set_alpha_to_one=False
    assert get_sampler("Euler").make_sigmas(config, 10)[-1] == 0
    assert len(get_sampler("LCM").make_sigmas(config, 4)) == 5
    euler, dpm = get_sampler("Euler").make_sigmas(config, 20), get_sampler("DPM++ 2M").make_sigmas(config, 20)
    assert not torch.equal(euler, dpm)  # diffusers' two "leading" spacings differ
