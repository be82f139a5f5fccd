"""DeepCache (opt-in): the shallow path is exact given the same deep features, the whole UNet runs on every
interval-th call only, and a generation with it stays close to the one without.

Its cost in prompt adherence on the built-in model is measured by `benchmarks/quality_speedups.py`."""

import dataclasses

import numpy as np
import pytest
import torch

import sdlab
from sdlab.config import TINY
from sdlab.deepcache import DeepCacheUNet
from sdlab.errors import ParameterError
from sdlab.model import Model
from sdlab.nn.unet import UNet
from sdlab.params import GenerationParams

CONFIGS = {
    "tiny": TINY.unet,
    "two_layers_odd_size": dataclasses.replace(TINY.unet, layers_per_block=2),
}


def random_unet(cfg) -> UNet:
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return unet


def inputs(cfg, size=(8, 8), batch=2):
    x = torch.randn(batch, cfg.in_channels, *size)
    return x, torch.tensor([500.0, 20.0][:batch]), torch.randn(batch, 5, cfg.context_dim)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_shallow_path_with_fresh_deep_features_equals_the_full_unet(name):
    cfg = CONFIGS[name]
    unet = random_unet(cfg)
    x, t, context = inputs(cfg, size=(8, 16) if name == "tiny" else (10, 6))
    full, deep = unet.forward_with_features(x, t, context)
    assert deep.shape == (2, cfg.channels[1], *x.shape[-2:])  # the second level's width, upsampled
    torch.testing.assert_close(full, unet(x, t, context), rtol=0, atol=0)
    shallow, reused = unet.forward_with_features(x, t, context, deep=deep)
    assert reused is deep
    torch.testing.assert_close(shallow, full, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_whole_unet_runs_every_interval_th_call_only():
    unet = random_unet(TINY.unet)
    deep_calls = []
    unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    cached = DeepCacheUNet(unet, interval=3)
    x, t, context = inputs(TINY.unet)
    outputs = [cached(x + 0.1 * i, t, context) for i in range(7)]
    assert len(deep_calls) == 3  # calls 0, 3, 6
    torch.testing.assert_close(outputs[3], unet(x + 0.3, t, context), rtol=0, atol=0)  # full calls are exact
    assert not torch.equal(outputs[1], unet(x + 0.1, t, context))  # in between: cached deep features


def test_interval_one_is_the_plain_unet_and_invalid_intervals_are_refused():
    unet = random_unet(TINY.unet)
    x, t, context = inputs(TINY.unet)
    with torch.no_grad():
        torch.testing.assert_close(DeepCacheUNet(unet, 1)(x, t, context), unet(x, t, context), rtol=0, atol=0)
    with pytest.raises(ParameterError, match="deepcache interval must be >= 1"):
        DeepCacheUNet(unet, 0)
    with pytest.raises(ParameterError, match="deepcache must be an integer from 1"):
        GenerationParams(deepcache=0).resolved(TINY)


def test_generation_with_deepcache_is_close_to_without_and_runs_fewer_deep_passes():
    model = Model.from_name(None)  # the built-in model: trained weights, so the deep features move slowly
    deep_calls = []
    hook = model.unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    try:
        params = GenerationParams(prompt="a red circle above a blue square", steps=12, seed=3)
        plain = sdlab.generate(model, params).images[0]
        n_plain = len(deep_calls)
        cached = sdlab.generate(model, params.replace(deepcache=3)).images[0]
        n_cached = len(deep_calls) - n_plain
        other_seed = sdlab.generate(model, params.replace(seed=4)).images[0]
    finally:
        hook.remove()
    assert n_plain == 12 and n_cached == 4
    plain, cached, other_seed = (np.asarray(image, dtype=np.float32) for image in (plain, cached, other_seed))
    # The same picture, changed: closer to the uncached image than another seed's image is.
    assert 0 < np.abs(cached - plain).mean() < np.abs(other_seed - plain).mean()
