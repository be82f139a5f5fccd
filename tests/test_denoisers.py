"""Denoisers: eps/v scalings, classifier-free guidance in one batched call, guidance rescale, inpainting."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sdlab.config import ScheduleConfig
from sdlab.diffusion.conditioning import Conditioning, batch_for_guidance
from sdlab.diffusion.denoisers import GuidedDenoiser, MaskedDenoiser, ModelDenoiser, rescale_guidance
from sdlab.diffusion.samplers import sample_euler, sample_euler_ancestral
from sdlab.diffusion.schedules import NoiseSchedule, make_sigmas
from sdlab.errors import ParameterError

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())


class RecordingNet:
    """Returns a fixed function of its inputs and records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, t, context):
        self.calls.append((x_in.clone(), t.clone(), context.clone()))
        return torch.sin(x_in[:, :4]) + t[:, None, None, None] / 1000 + context.mean(dim=(1, 2))[:, None, None, None]


def test_eps_prediction_scalings():
    net = RecordingNet()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(3.0)
    context = torch.randn(2, 5, 16)
    denoised = ModelDenoiser(net, SCHEDULE)(x, sigma, Conditioning(context))
    x_in, t, _ = net.calls[0]
    torch.testing.assert_close(x_in, x / 10**0.5)  # c_in = 1 / sqrt(sigma^2 + 1)
    torch.testing.assert_close(SCHEDULE.t_to_sigma(t), torch.full((2,), 3.0))
    torch.testing.assert_close(denoised, x - 3.0 * net(x_in, t, context))


def test_v_prediction_recovers_x0_from_the_true_v():
    """For x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)."""
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = 600
    a = SCHEDULE.alphas_cumprod[t]
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    sigma = SCHEDULE.sigmas[t]
    denoiser = ModelDenoiser(lambda x_in, t, c: v, SCHEDULE, "v_prediction")
    x = x0 + sigma * eps  # the VE sample
    torch.testing.assert_close(denoiser(x, sigma, Conditioning(torch.zeros(1, 1, 1))), x0, atol=1e-5, rtol=1e-5)


def test_per_sample_sigmas_and_quantized_timesteps():
    net = RecordingNet()
    mid = (SCHEDULE.sigmas[100] * SCHEDULE.sigmas[101]).sqrt() * 1.001  # just above 100.5
    ModelDenoiser(net, SCHEDULE, quantize=True)(torch.randn(2, 4, 4, 4), torch.stack([mid, SCHEDULE.sigmas[7]]),
                                                 Conditioning(torch.zeros(2, 1, 1)))
    assert net.calls[0][1].tolist() == [101.0, 7.0]


def test_unknown_prediction_type():
    with pytest.raises(ParameterError, match="v_prediction"):
        ModelDenoiser(RecordingNet(), SCHEDULE, "sample")


def test_guidance_is_one_batched_call_and_skipped_at_scale_1():
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(5.0)
    cond, uncond = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    net = RecordingNet()
    model = ModelDenoiser(net, SCHEDULE)
    guided = GuidedDenoiser(model, Conditioning(cond), Conditioning(uncond), scale=7.5)(x, sigma)
    assert len(net.calls) == 1
    x_in, t, context = net.calls[0]
    assert x_in.shape[0] == 4 and torch.equal(context, torch.cat([uncond, cond]))
    out_u, out_c = net(x_in, t, context).chunk(2)
    torch.testing.assert_close(guided, x - 5.0 * (out_u + 7.5 * (out_c - out_u)))

    net.calls.clear()
    plain = GuidedDenoiser(model, Conditioning(cond), Conditioning(uncond), scale=1.0)(x, sigma)
    assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 2
    torch.testing.assert_close(plain, model(x, sigma, Conditioning(cond)))


def test_guidance_rescale_matches_diffusers():
    guided, cond = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7))


def test_inpainting_model_gets_mask_and_masked_image_channels():
    net = RecordingNet()
    x, concat = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8)
    cond = Conditioning(torch.randn(1, 3, 16), concat=concat)
    uncond = Conditioning(torch.randn(1, 3, 16), concat=concat)
    GuidedDenoiser(ModelDenoiser(net, SCHEDULE), cond, uncond, scale=3.0)(x, torch.tensor(2.0))
    x_in = net.calls[0][0]
    assert x_in.shape == (2, 9, 8, 8)
    torch.testing.assert_close(x_in[:, 4:], torch.cat([concat, concat]))
    torch.testing.assert_close(x_in[:, :4], torch.cat([x, x]) / 5**0.5)


@pytest.mark.parametrize("sampler", [sample_euler, sample_euler_ancestral])
def test_masked_denoiser_keeps_the_unmasked_region(sampler):
    init, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # repaint the centre
    seen = []

    def inner(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)  # a model that paints zeros

    sigmas = make_sigmas(ScheduleConfig(), 6)
    x = noise * sigmas[0]
    out = sampler(MaskedDenoiser(inner, init, mask, noise), x, sigmas, generator=torch.Generator().manual_seed(0))
    keep = (1 - mask).bool().expand_as(out)
    torch.testing.assert_close(out[keep], init[keep])  # the kept region is the original image
    assert out[~keep].abs().max() < 1e-6  # the repainted region is the model's
    x_seen, sigma_seen = seen[3]  # the model saw the original, noised to the current sigma
    torch.testing.assert_close(x_seen[keep], (init + sigma_seen[0] * noise)[keep])


def test_conditioning_parts_are_batched_for_guidance_in_one_place_and_reach_the_network():
    """The pooled/added vector and control units (SDXL, ControlNet / T2I-Adapter) travel with the context:
    joined as [uncond; cond] for one CFG call and passed to the network by name (the units as the residuals
    they make); unset parts are not passed."""
    from sdlab.diffusion.control import BoundControl

    seen = {}

    def net(x_in, t, context, **inputs):
        seen.update(inputs, context=context)
        return torch.zeros(x_in.shape[0], 4, *x_in.shape[2:])

    def conditioning(value):
        adapter = BoundControl(torch.nn.Identity(), (torch.full((1, 2, 4, 4), value),), torch.ones(1),
                               sigmas=torch.tensor([10.0, 0.0]))  # (features given: a T2I-Adapter's)
        return Conditioning(torch.full((1, 3, 8), value), added=torch.full((1, 6), value), control=(adapter,))

    uncond, cond = conditioning(0.0), conditioning(1.0)
    GuidedDenoiser(ModelDenoiser(net, SCHEDULE), cond, uncond, scale=5.0)(torch.randn(1, 4, 4, 4), 2.0)
    assert seen["context"][:, 0, 0].tolist() == [0.0, 1.0] and seen["added"][:, 0].tolist() == [0.0, 1.0]
    assert seen["control"].encoder[0][:, 0, 0, 0].tolist() == [0.0, 1.0]
    both = batch_for_guidance(uncond, cond)
    assert torch.equal(both.chunk(2)[1].control[0].inputs[0], cond.control[0].inputs[0])
    assert Conditioning(torch.zeros(1, 3, 8)).network_inputs() == {}
    with pytest.raises(ParameterError, match="added"):
        batch_for_guidance(Conditioning(torch.zeros(1, 3, 8)), cond)


def test_each_prediction_is_a_parameterization_with_its_scalings_and_target():
    """eps and v as small classes: D = c_skip x + c_out F(c_in x), and the training target."""
    from sdlab.diffusion.parameterization import get_parameterization

    sigma = torch.tensor([0.5, 3.0])
    x, out, x0, noise = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(4))
    s = sigma[:, None, None, None]
    eps, v = get_parameterization("epsilon"), get_parameterization("v_prediction")
    assert torch.equal(eps.denoised(x, sigma, out), x - s * out)
    torch.testing.assert_close(v.denoised(x, sigma, out), x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out)
    assert torch.equal(eps.c_in(sigma), v.c_in(sigma)) and torch.allclose(eps.c_in(sigma), (sigma**2 + 1).rsqrt())
    # x_t = sqrt(a) x0 + sqrt(1 - a) eps is x0 + sigma eps scaled by c_in, with sigma^2 = (1 - a) / a
    alphas = 1 / (sigma**2 + 1)
    x_t = alphas.sqrt()[:, None, None, None] * x0 + (1 - alphas).sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(v.denoised(x_t / v.c_in(s), sigma, v.target(x0, noise, alphas)), x0)
    torch.testing.assert_close(eps.denoised(x_t / eps.c_in(s), sigma, eps.target(x0, noise, alphas)), x0)
    with pytest.raises(ParameterError, match="unknown prediction 'flow'"):
        get_parameterization("flow")
