"""Stopping a generation inside the networks (sdlab.interrupts), chunked attention, and pricing requests
before running them (sdlab.cost)."""

import pytest
import torch

import sdlab
from sdlab import GenerationParams
from sdlab.config import PRESETS, TINY
from sdlab.cost import NetworkCost, _count, cost_model
from sdlab.interrupts import GenerationAborted
from sdlab.nn import layers
from sdlab.nn.layers import Attention, SpatialSelfAttention

SMALL = dict(width=32, height=32, steps=3, seed=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdlab.Model.build(TINY)


class AbortWhen:
    """abort() turns True once module `trigger` is entered; counts the modules entered after that."""

    def __init__(self, model, trigger):
        self.fired, self.after = False, 0
        self.handles = [trigger.register_forward_pre_hook(self._fire)]
        for net in (model.text_encoder, model.unet, model.vae):
            self.handles += [m.register_forward_hook(self._count) for m in net.modules()]

    def _fire(self, module, args):
        self.fired = True

    def _count(self, module, args, out):
        self.after += self.fired

    def __call__(self) -> bool:
        return self.fired

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("where", ["text encoder", "unet mid-step", "vae decode", "vae encode"])
def test_abort_stops_inside_every_network(model, where):
    """The abort is seen at the next module entered, whichever network runs (a VAE decode of a large image
    once held the server's worker for 47 minutes: between sampler steps was the only place it looked)."""
    trigger = {"text encoder": model.text_encoder.text_model.encoder.layers[0],
               "unet mid-step": model.unet.mid_block, "vae decode": model.vae.decoder.mid_block,
               "vae encode": model.vae.encoder.mid_block}[where]
    params = GenerationParams(prompt="a red circle", **SMALL)
    if where == "vae encode":
        params = params.replace(init_image=sdlab.generate(model, params).images[0], strength=0.5)
    abort = AbortWhen(model, trigger)
    try:
        with pytest.raises(GenerationAborted):
            sdlab.generate(model, params, abort=abort)
    finally:
        abort.remove()
    assert abort.fired and abort.after == 0  # not one module finished after the request to stop
    plain = sdlab.generate(model, GenerationParams(prompt="a red circle", **SMALL))  # hooks are gone
    assert torch.equal(plain.latents, sdlab.generate(model, GenerationParams(prompt="a red circle", **SMALL)).latents)


def test_abort_that_never_fires_changes_nothing(model):
    params = GenerationParams(prompt="a red circle", **SMALL)
    assert torch.equal(sdlab.generate(model, params).latents,
                       sdlab.generate(model, params, abort=lambda: False).latents)


def test_long_attention_runs_in_query_chunks_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    spatial, cross = SpatialSelfAttention(32, 4), Attention(32, 2, 16, context_dim=24)
    x, tokens, context = torch.randn(2, 32, 24, 24), torch.randn(2, 576, 32), torch.randn(2, 77, 24)
    with torch.no_grad():
        whole = spatial(x), cross(tokens, context)
        monkeypatch.setattr(layers, "MAX_CHUNK_WORK", 2**19)
        assert layers.query_chunk(2, 576, 32) < 576  # the limit now splits these
        calls = []
        handle = spatial.to_q.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
        chunked = spatial(x), cross(tokens, context)
        handle.remove()
    assert len(calls) > 1 and sum(calls) == 576
    assert torch.allclose(whole[0], chunked[0], atol=1e-6) and torch.allclose(whole[1], chunked[1], atol=1e-6)


def test_sd15_cost_matches_the_measured_figures():
    """shared/MEASUREMENTS.md: UNet 0.180 / 0.803 TFLOP at 32x32 / 64x64 latents, VAE decode 0.62 / 2.51."""
    costs = cost_model(PRESETS["sd15"])
    assert costs.unet.flops(32 * 32) == pytest.approx(0.180e12, rel=0.01)
    assert costs.unet.flops(64 * 64) == pytest.approx(0.803e12, rel=0.01)
    assert costs.decode.flops(32 * 32) == pytest.approx(0.62e12, rel=0.01)
    assert costs.decode.flops(64 * 64) == pytest.approx(2.51e12, rel=0.01)


def test_the_fit_predicts_sizes_it_was_not_counted_at():
    """flops = c + a p + b p^2 is exact for convolutions (linear) and self-attention (quadratic): check the
    fit from 3 small sizes against a direct count at a large, non-square size."""
    from sdlab.nn.unet import UNet
    from sdlab.nn.vae import VAE

    costs = cost_model(TINY)
    with torch.device("meta"):
        unet, vae = UNet(TINY.unet), VAE(TINY.vae)
    h, w = 48, 80
    direct_unet = _count(unet, torch.zeros(1, 4, h, w), torch.zeros(1), torch.zeros(1, 77, TINY.unet.context_dim))
    direct_decode = _count(vae.decode, torch.zeros(1, 4, h, w))
    assert costs.unet.flops(h * w) == pytest.approx(direct_unet, rel=1e-3)
    assert costs.decode.flops(h * w) == pytest.approx(direct_decode, rel=1e-3)


def test_request_flops_count_steps_guidance_images_and_the_vae():
    costs = NetworkCost(0.0, 1.0, 0.0)
    model_costs = cost_model(TINY).__class__(unet=costs, decode=NetworkCost(0.0, 10.0, 0.0),
                                             encode=NetworkCost(0.0, 100.0, 0.0), text_chunk=0.0)
    base = GenerationParams(prompt="x", width=64, height=64, steps=10, cfg_scale=5, batch_size=2, seed=0)
    p = (64 // TINY.vae.downscale) ** 2
    assert model_costs.request_flops(TINY, base) == 10 * 2 * 2 * p + 2 * 10 * p
    assert model_costs.request_flops(TINY, base.replace(cfg_scale=1.0)) == 10 * 1 * 2 * p + 2 * 10 * p
    assert model_costs.request_flops(TINY, base.replace(sampler="Heun")) == 2 * (10 * 2 * 2 * p) + 2 * 10 * p
    assert model_costs.request_flops(TINY, base, n_iter=3) == 3 * model_costs.request_flops(TINY, base)
