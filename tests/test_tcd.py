"""The TCD sampler (Trajectory Consistency Distillation; Hyper-SD and TCD LoRAs) against diffusers' TCDScheduler.

- On the toy network of tests/test_samplers.py, diffusers' own loop with TCDScheduler.step(eta=gamma) and
  sdlab's sampler give the same final latents (1e-4 relative), eps and v prediction.
- On the tiny random SD model of tests/test_generation_parity.py, diffusers' StableDiffusionPipeline with
  TCDScheduler and sdlab.generate(sampler="TCD", eta=gamma) give the same 8-bit image (<= 2/255) at 1, 2, 4
  and 8 steps with gamma 0, 0.3 and 1; a v-prediction model too; a folder whose scheduler is TCDScheduler
  picks TCD in the drop-in pipeline, which passes its eta (default 0.0) as diffusers' does.
- Bad input (more steps than the 50-step distillation schedule, gamma above 1) is a ParameterError; the CLI
  and the server offer the sampler.
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_generation_parity import CFG, NEGATIVE, PROMPT, _max_diff, _save, folder  # noqa: F401
from test_samplers import CONTEXT, SD_SCHEDULER, SHAPE, ToyNet, assert_close, gaussian_denoiser

import sdlab
from sdlab import GenerationParams
from sdlab.cli import main
from sdlab.config import TINY, ScheduleConfig
from sdlab.diffusion import samplers as S
from sdlab.diffusion.conditioning import Conditioning
from sdlab.diffusion.denoisers import GuidedDenoiser, ModelDenoiser
from sdlab.diffusion.registry import get_sampler, with_options
from sdlab.diffusion.schedules import NoiseSchedule, ve_to_vp
from sdlab.errors import ParameterError
from sdlab.pngmeta import parse_infotext, read_infotext
from sdlab.server import ServerSettings, create_app

GAMMAS = (0.0, 0.3, 1.0)
STEPS = (1, 2, 4, 8)
SEED = 3


# --- the sampler on a toy network ---------------------------------------------------------------------


@torch.no_grad()
def _diffusers_loop(steps, gamma, prediction):
    """diffusers' denoising loop with TCDScheduler around the toy network (no input scaling: TCD's is 1)."""
    net, scheduler = ToyNet(), diffusers.TCDScheduler(**SD_SCHEDULER, prediction_type=prediction)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t, CONTEXT), t, x, eta=gamma, generator=generator).prev_sample
    return x


@torch.no_grad()
def _sdlab_loop(steps, gamma, prediction):
    spec = with_options(get_sampler("TCD"), eta=gamma)
    sigmas = spec.make_sigmas(ScheduleConfig(), steps)  # (steps + 1,), ending at sigma_min (timestep 0)
    model = ModelDenoiser(ToyNet(), NoiseSchedule.from_config(ScheduleConfig()), prediction)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator) * spec.initial_noise_scale(sigmas)
    x = spec.sample(GuidedDenoiser(model, Conditioning(CONTEXT)), x, sigmas, generator=generator)
    return ve_to_vp(x, sigmas[-1])  # diffusers' latent at timestep 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", (0.0, 0.3, 0.5, 1.0))
@pytest.mark.parametrize("steps", (1, 2, 4, 8, 50))
def test_matches_diffusers_scheduler(steps, gamma, prediction):
    assert_close(_sdlab_loop(steps, gamma, prediction), _diffusers_loop(steps, gamma, prediction))


def test_gamma_0_is_ddim_and_gamma_draws_noise():
    """gamma = 0 walks the predicted trajectory deterministically: DDIM (eta 0) on the same sigmas."""
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sigmas = get_sampler("TCD").make_sigmas(schedule, 4)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6
    tcd = S.sample_tcd(gaussian_denoiser, x, sigmas.double(), eta=0.0, schedule=schedule)
    torch.testing.assert_close(tcd, S.sample_ddim(gaussian_denoiser, x, sigmas.double()))
    noisy = [S.sample_tcd(gaussian_denoiser, x, sigmas.double(), eta=0.3, schedule=schedule,
                          generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    torch.testing.assert_close(noisy[0], noisy[1], rtol=0, atol=0)  # randomness only from the generator
    assert not torch.allclose(noisy[0], noisy[2]) and not torch.allclose(noisy[0], tcd)


def test_default_gamma_is_0_3_as_diffusers_scheduler():
    assert get_sampler("TCD").sample.__kwdefaults__["eta"] == 0.3
    assert diffusers.TCDScheduler.step.__defaults__[0] == 0.3  # step(model_output, timestep, sample, eta=0.3, ...)


# --- images: diffusers' pipeline vs sdlab.generate -------------------------------------------------------


def _diffusers_pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(folder):  # noqa: F811 (the fixture imported from test_generation_parity)
    return _diffusers_pipe(folder), sdlab.load(folder)


def _theirs(pipe, steps, gamma, **extra):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, height=64,
                width=64, eta=gamma, generator=torch.Generator().manual_seed(SEED), output_type="np",
                **extra).images


def _ours(model, steps, gamma, **extra):
    # schedule "automatic": TCD's own timesteps (the model's default schedule would be Karras).
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, height=64,
                              width=64, sampler="TCD", schedule="automatic", eta=gamma, **extra)
    return sdlab.generate(model, params, generator=torch.Generator().manual_seed(SEED)).images


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("steps", STEPS)
def test_images_match_diffusers(pipes, steps, gamma):
    theirs, model = pipes
    assert _max_diff(_ours(model, steps, gamma), _theirs(theirs, steps, gamma)) <= 2


def test_default_eta_is_gamma_0_3(pipes):
    theirs, model = pipes
    assert _max_diff(_ours(model, 4, None), _theirs(theirs, 4, 0.3)) <= 2


def test_v_prediction_model(tmp_path_factory):
    folder = _save(tmp_path_factory, TINY.replace(prediction="v_prediction"), "tiny_v")
    theirs, model = _diffusers_pipe(folder), sdlab.load(folder)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    for steps, gamma in ((2, 0.3), (4, 1.0), (8, 0.0)):
        assert _max_diff(_ours(model, steps, gamma), _theirs(theirs, steps, gamma)) <= 2, (steps, gamma)


def test_folder_with_tcd_scheduler_picks_tcd_and_passes_eta(pipes, tmp_path):
    theirs, _ = pipes
    theirs.save_pretrained(tmp_path / "tcd")  # the tiny model with scheduler/ = TCDScheduler
    pipe = sdlab.StableDiffusionPipeline.from_pretrained(tmp_path / "tcd")
    assert pipe.sampler == "TCD"
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=CFG, height=64, width=64)
    for eta in (None, 0.3):  # None: both pipelines' default eta=0.0, i.e. gamma 0
        options = {} if eta is None else {"eta": eta}
        ours = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), **call, **options).images
        reference = theirs(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **call,
                           **options).images
        assert _max_diff(ours, reference) <= 2, eta


# --- bad input, CLI, server -----------------------------------------------------------------------------


def test_more_steps_than_the_distillation_schedule_is_a_parameter_error(pipes):
    _, model = pipes
    with pytest.raises(ParameterError, match=r"steps=51.*TCD.*1 to 50"):
        _ours(model, 51, 0.3)


def test_gamma_above_1_is_a_parameter_error(pipes):
    _, model = pipes
    with pytest.raises(ParameterError, match="eta=1.5.*gamma.*from 0"):
        _ours(model, 4, 1.5)


def test_cli_generates_with_tcd(tmp_path, capsys):
    code = main(["generate", "a red circle", "--model", "random:tiny", "--steps", "4", "--size", "32x32", "-q",
                 "--seed", "5", "--sampler", "TCD", "--schedule", "automatic", "--eta", "0.3",
                 "--out", str(tmp_path)])
    paths = [line for line in capsys.readouterr().out.splitlines() if line]
    assert code == 0 and len(paths) == 1
    fields = parse_infotext(read_infotext(paths[0])).fields
    assert (fields["Sampler"], fields["Eta"], fields["Steps"]) == ("TCD", "0.3", "4")
    assert main(["samplers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["samplers"]
    assert {"name": "TCD", "key": "tcd", "reference": "TCDScheduler"}.items() <= listed[-1].items()


def test_server_lists_and_runs_tcd():
    with TestClient(create_app(ServerSettings(model="random:tiny")), base_url="http://localhost") as client:
        samplers = client.get("/sdapi/v1/samplers").json()
        assert {"name": "TCD", "aliases": ["tcd"]}.items() <= samplers[-1].items()
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, "sampler_name": "TCD", "steps": 2,
                                                   "width": 32, "height": 32, "eta": 0.3})
        assert r.status_code == 200, r.text
        fields = parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).fields
        assert fields["Sampler"] == "TCD"


def test_distilled_samplers_default_to_their_own_timesteps():
    """Left unset, the schedule of LCM and TCD is their distillation timesteps ("automatic"), not the Karras
    ramp other samplers default to."""
    from sdlab.config import TINY
    from sdlab.params import GenerationParams

    for sampler, schedule in (("LCM", "automatic"), ("TCD", "automatic"), ("Euler", "karras")):
        assert GenerationParams(prompt="x", sampler=sampler).resolved(TINY).schedule == schedule
    assert GenerationParams(prompt="x", sampler="TCD", schedule="karras").resolved(TINY).schedule == "karras"
