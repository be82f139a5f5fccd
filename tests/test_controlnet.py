"""ControlNet and T2I-Adapter: the networks against diffusers' on the same random weights, and diffusers' own
pipeline calls (StableDiffusionControlNet[Img2Img|Inpaint]Pipeline, StableDiffusionXLControlNetPipeline with a
list of nets, StableDiffusion[XL]AdapterPipeline) with only the import changed, giving the same 8-bit images
(<= 2/255) on tiny random-weight models; plus what has no diffusers counterpart: A1111's control modes,
DeepCache and the refiner with control, and bad input.

The tiny models' VAE halves the image (64x64 -> 32x32 latents), so their ControlNets' hint encoders have one
stride-2 step (embedding_channels of two widths) instead of SD's three. Control weights are drawn large
(zero convolutions are zero in a fresh net) so that control visibly changes the image.
"""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.checkpoints.configs import controlnet_from_diffusers
from sdlab.config import TINY
from sdlab.control import ControlUnit, load_controlnet, load_t2i_adapter, save_controlnet
from sdlab.control.preprocess import inpaint_hint
from sdlab.errors import ParameterError
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.nn.controlnet import ControlNet, ControlNetConfig
from sdlab.nn.t2i_adapter import T2IAdapter, T2IAdapterConfig
from sdlab.nn.unet import ControlResiduals, UNet
from sdlab.params import GenerationParams

PROMPT = "a red circle above a blue square"
CFG, STEPS = 3.0, 5


def _randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, 0.3 if name.startswith("controlnet_") or "adapter" in name else 0.1)
    return net


def _controlnet(config, seed: int, **options) -> ControlNet:
    return _randomize(ControlNet(ControlNetConfig.for_unet(config.unet, embedding_channels=(8, 16), **options)), seed)


def _image(seed=0, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=64) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255
    return Image.fromarray(mask)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=int) for i in images])


def _max_diff(a, b) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def _save_model(tmp_path_factory, config, name):
    torch.manual_seed(0)
    return sdlab.Model.build(config).save(tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_model(tmp_path_factory, TINY, "tiny")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    config = dataclasses.replace(TINY, name="tiny-inpaint", unet=dataclasses.replace(TINY.unet, in_channels=9))
    return _save_model(tmp_path_factory, config, "tiny_inpaint")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return _save_model(tmp_path_factory, TINY_SDXL, "sdxl")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two ControlNet folders for TINY."""
    root = tmp_path_factory.mktemp("controlnets")
    return [save_controlnet(_controlnet(TINY, seed), root / f"cn{seed}") for seed in (1, 2)]


@pytest.fixture(scope="module")
def sdxl_nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_controlnets")
    return [save_controlnet(_controlnet(TINY_SDXL, seed), root / f"cn{seed}") for seed in (1, 2)]


def _pipes(cls_name, model_folder, net_folders, sampler="Euler"):
    """(diffusers' pipeline, sdlab's) of class `cls_name` on the same model and ControlNet folders."""
    pipes = []
    for lib in (diffusers, sdlab):
        loaded = [lib.ControlNetModel.from_pretrained(f) for f in net_folders]
        controlnet = loaded[0] if len(loaded) == 1 else loaded
        pipe = getattr(lib, cls_name).from_pretrained(model_folder, controlnet=controlnet, safety_checker=None)
        if lib is diffusers:
            pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe.sampler = sampler
        pipes.append(pipe)
    return pipes


def _run(pipe, *args, seed=1, **kwargs):
    return pipe(*args, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, guidance_scale=CFG,
                **kwargs).images


# --- the network ------------------------------------------------------------------------------------------


def _diffusers_controlnet(sdxl: bool, **extra):
    kwargs = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  conditioning_embedding_out_channels=(16, 32, 32, 32), **extra)
    if sdxl:
        kwargs.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                      use_linear_projection=True, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4))
    return _randomize(diffusers.ControlNetModel(**kwargs).eval(), 0)


@pytest.mark.parametrize("sdxl, extra", [
    (False, {}), (True, {}), (False, {"global_pool_conditions": True}),
    (False, {"controlnet_conditioning_channel_order": "bgr"}),
], ids=["sd", "sdxl", "global-pool", "bgr"])  # fmt: skip
def test_network_equals_diffusers_controlnet(sdxl, extra):
    theirs = _diffusers_controlnet(sdxl, **extra)
    config = controlnet_from_diffusers(json.loads(json.dumps(dict(theirs.config))))
    ours = ControlNet(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, context, hint = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.rand(2, 3, 64, 64)
    t = torch.tensor([500, 20])
    added, kwargs = None, {}
    if sdxl:
        text, ids = torch.randn(2, 32), torch.randn(2, 6) * 100
        added, kwargs = torch.cat([text, ids], 1), {"added_cond_kwargs": {"text_embeds": text, "time_ids": ids}}
    with torch.no_grad():
        skips, middle = theirs(x, t, context, hint, return_dict=False, **kwargs)
        got = ours(x, t, context, hint, added=added)
    assert len(got.skips) == len(skips) == 6
    for a, b in zip(skips, got.skips):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.middle, middle, atol=1e-4, rtol=1e-4)


def test_folders_round_trip_with_diffusers(tmp_path):
    theirs = _diffusers_controlnet(False)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_controlnet(tmp_path / "theirs", plain=True)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    save_controlnet(ours, tmp_path / "ours")
    again = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in theirs.state_dict().items())
    with pytest.raises(FileExistsError):  # never replaced silently
        save_controlnet(ours, tmp_path / "ours")


def test_fast_path_keeps_the_numbers(nets):
    fast, plain = load_controlnet(nets[0]), load_controlnet(nets[0], plain=True)
    x, context, hint = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = fast(x, 10, context, hint), plain(x, 10, context, hint)
    for r, s in zip(a.skips, b.skips):  # float rounding (matmul order), relative to the values' size
        torch.testing.assert_close(r, s, atol=1e-5 * float(s.abs().max()), rtol=1e-4)


# --- diffusers' pipelines, import changed -------------------------------------------------------------------


CALLS = {
    "defaults": ({}, 1),
    "scale and window": ({"controlnet_conditioning_scale": 0.7, "control_guidance_start": 0.2,
                          "control_guidance_end": 0.8}, 1),
    "guess mode": ({"guess_mode": True}, 1),
    "two nets": ({"controlnet_conditioning_scale": [1.0, 0.5], "control_guidance_end": [1.0, 0.6]}, 2),
    "two nets, guess mode": ({"guess_mode": True, "negative_prompt": "blurry"}, 2),
}  # fmt: skip


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_controlnet_txt2img_equals_diffusers(folder, nets, call):
    kwargs, n = CALLS[call]
    theirs, ours = _pipes("StableDiffusionControlNetPipeline", folder, nets[:n])
    image = _image(1) if n == 1 else [_image(1), _image(2)]
    a, b = _run(theirs, PROMPT, image=image, **kwargs), _run(ours, PROMPT, image=image, **kwargs)
    assert b[0].size == (64, 64) and _max_diff(a, b) <= 2
    plain = _run(sdlab.StableDiffusionPipeline.from_pretrained(folder), PROMPT, height=64, width=64)
    assert _max_diff(plain, b) > 10  # the control steered the image


def test_controlnet_heun_equals_diffusers(folder, nets):
    theirs, ours = _pipes("StableDiffusionControlNetPipeline", folder, nets[:1], sampler="Heun")
    theirs.scheduler = diffusers.HeunDiscreteScheduler.from_config(theirs.scheduler.config)
    a, b = _run(theirs, PROMPT, image=_image(1)), _run(ours, PROMPT, image=_image(1))
    assert _max_diff(a, b) <= 2


def test_the_step_window_counts_steps_not_evaluations():
    """Deliberately unlike diffusers for second-order samplers: diffusers' Heun lists each step's timesteps
    twice and applies control_guidance_start/end to that list of 2N - 1 evaluations; sdlab (as A1111) to the
    N steps, an evaluation between two noise levels belonging to the step it is part of."""
    unit = ControlUnit(_controlnet(TINY, 1), torch.rand(1, 3, 64, 64), start=0.4, end=0.8)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 5 steps: 2 and 3 are in [0.4, 0.8]
    cond, _ = unit.bind(1, 64, 64, sigmas, False, "cpu", torch.float32)
    steered = [level for level in (8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.2) if cond.active(torch.tensor([level]))]
    assert steered == [2.0, 1.5, 1.0, 0.7]  # steps 2 and 3, their second evaluations included
    assert cond.active(torch.tensor([9.0])) is False  # above the first level (churn): step 0


def test_controlnet_img2img_equals_diffusers(folder, nets):
    theirs, ours = _pipes("StableDiffusionControlNetImg2ImgPipeline", folder, nets[:1])
    for extra in ({}, {"strength": 0.6, "control_guidance_end": 0.5}):
        kwargs = {"image": _image(3), "control_image": _image(1), **extra}
        assert _max_diff(_run(theirs, PROMPT, **kwargs), _run(ours, PROMPT, **kwargs)) <= 2


@pytest.mark.parametrize("which", ["inpaint_folder", "folder"], ids=["9-channel", "blended"])
def test_controlnet_inpaint_equals_diffusers(request, nets, which):
    """diffusers' inpainting-ControlNet example: the control image is the picture with -1 where the mask is."""
    theirs, ours = _pipes("StableDiffusionControlNetInpaintPipeline", request.getfixturevalue(which), nets[:1])
    image, mask = _image(3), _mask()
    kwargs = {"image": image, "mask_image": mask, "control_image": inpaint_hint(image, mask)}
    for extra in ({}, {"strength": 0.7, "controlnet_conditioning_scale": 1.0}):
        assert _max_diff(_run(theirs, PROMPT, **kwargs, **extra), _run(ours, PROMPT, **kwargs, **extra)) <= 2


@pytest.mark.parametrize("kwargs", [
    {"controlnet_conditioning_scale": [0.8, 0.6], "control_guidance_start": [0.0, 0.4]},
    {"guess_mode": True},
], ids=["two nets", "guess mode"])  # fmt: skip
def test_sdxl_controlnet_list_equals_diffusers(sdxl_folder, sdxl_nets, kwargs):
    theirs, ours = _pipes("StableDiffusionXLControlNetPipeline", sdxl_folder, sdxl_nets)
    images = [_image(1), _image(2)]
    theirs.controlnet = diffusers.MultiControlNetModel(list(theirs.controlnet.nets))
    a, b = _run(theirs, PROMPT, image=images, **kwargs), _run(ours, PROMPT, image=images, **kwargs)
    assert _max_diff(a, b) <= 2


# --- T2I-Adapter ----------------------------------------------------------------------------------------------


def _adapter_folder(tmp_path, config, channels, **options):
    adapter = diffusers.T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, **options)
    _randomize(adapter, 4).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_t2i_adapter_equals_diffusers_adapter_pipeline(tmp_path, folder, sdxl_folder, sdxl):
    """diffusers' StableDiffusion[XL]AdapterPipeline against a ControlUnit with the same adapter: the features
    are added inside the encoder (and, SDXL, to the middle block) at every step, on both CFG halves."""
    if sdxl:
        model_folder, cls = sdxl_folder, diffusers.StableDiffusionXLAdapterPipeline
        where = _adapter_folder(tmp_path, TINY_SDXL, [32, 64, 64, 64], downscale_factor=4,
                                adapter_type="full_adapter_xl")
    else:
        model_folder, cls = folder, diffusers.StableDiffusionAdapterPipeline
        where = _adapter_folder(tmp_path, TINY, [32, 64], downscale_factor=2)
    adapter = diffusers.T2IAdapter.from_pretrained(where)
    theirs = cls.from_pretrained(model_folder, adapter=adapter, safety_checker=None)
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    a = _run(theirs, PROMPT, image=_image(1), adapter_conditioning_scale=0.8, height=64, width=64)
    model = sdlab.load(model_folder)
    unit = ControlUnit(load_t2i_adapter(where), _image(1), scale=0.8, resize_mode="Just Resize")
    params = GenerationParams(prompt=PROMPT, steps=STEPS, cfg_scale=CFG, sampler="Euler", schedule="automatic",
                              seed=1, width=64, height=64, control=(unit,))
    b = sdlab.generate(model, params).images
    plain = sdlab.generate(model, params.replace(control=())).images
    assert _max_diff(a, b) <= 2 and _max_diff(plain, b) > 10


# --- what diffusers does not have: A1111's modes, DeepCache, the refiner -----------------------------------


def _params(net, **unit):
    return GenerationParams(prompt=PROMPT, steps=STEPS, cfg_scale=CFG, seed=3, width=64, height=64,
                            control=(ControlUnit(net, _image(1), **unit),))


def test_a1111_modes_weigh_residuals_as_sd_webui_controlnet():
    """'My prompt is more important': 0.825 ** (K - k) on skip k of K, 1 on the middle, both CFG halves;
    'ControlNet is more important': the same scales on the conditional half only (A1111's cfg_injection)."""
    net = _controlnet(TINY, 1).eval()
    x, context, t = torch.randn(2, 4, 32, 32), torch.randn(2, 7, 32), torch.tensor([10, 10])
    with torch.no_grad():
        raw = net(x, t, context, torch.rand(2, 3, 64, 64))
    for mode in ("prompt", "control", "balanced"):
        unit = ControlUnit(net, torch.rand(1, 3, 64, 64), scale=0.5, mode=mode)
        cond, uncond = unit.bind(1, 64, 64, torch.tensor([10.0, 1.0, 0.0]), True, "cpu", torch.float32)
        both = type(cond).cat([uncond, cond])
        both = dataclasses.replace(both, inputs=(torch.cat([cond.inputs[0]] * 2),))
        got = both.residuals(x, t, torch.tensor([10.0, 10.0]), context, None)
        with torch.no_grad():
            raw = net(x, t, context, both.inputs[0])
        k = len(raw.skips)
        scales = [1.0] * (k + 1) if mode == "balanced" else [0.825 ** (k - i) for i in range(k + 1)]
        halves = torch.tensor([0.0 if mode == "control" else 1.0, 1.0]).view(2, 1, 1, 1)
        for i, (r, s) in enumerate(zip([*raw.skips, raw.middle], [*got.skips, got.middle])):
            torch.testing.assert_close(s, r * 0.5 * scales[i] * halves, atol=1e-5, rtol=1e-5)


def test_modes_are_named_as_a1111_names_them(folder):
    model = sdlab.load(folder)
    net = _controlnet(TINY, 1)
    images = {mode: sdlab.generate(model, _params(net, mode=mode)).images
              for mode in ("balanced", "My prompt is more important", "ControlNet is more important", 2)}
    assert _max_diff(images["balanced"], images["My prompt is more important"]) > 2
    assert _max_diff(images["ControlNet is more important"], images[2]) == 0  # A1111's index 2


def test_deepcache_shallow_steps_add_the_first_levels_residuals_only():
    """A shallow (cached) call reads conv_in's and the first level's skips; their residuals are added, the
    deeper ones reached the output through the cached features of the last full call."""
    unet = _randomize(UNet(TINY.unet), 5).eval()
    x, context = torch.randn(1, 4, 32, 32), torch.randn(1, 7, 32)
    control = _controlnet(TINY, 1).eval()(x, 10, context, torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        _, deep = unet.forward_with_features(x, 10, context, control=control)
        first = 1 + TINY.unet.layers_per_block
        garbage = ControlResiduals(skips=control.skips[:first] + tuple(torch.randn_like(s) * 100
                                                                          for s in control.skips[first:]),
                                   middle=torch.randn_like(control.middle))
        a, _ = unet.forward_with_features(x, 10, context, deep=deep, control=control)
        b, _ = unet.forward_with_features(x, 10, context, deep=deep, control=garbage)
        c, _ = unet.forward_with_features(x, 10, context, deep=deep)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3  # and the first level's residuals do act


def test_control_with_deepcache_and_with_the_refiner(folder, tmp_path_factory, sdxl_folder):
    model = sdlab.load(folder)
    net = _controlnet(TINY, 1)
    params = _params(net)
    full = sdlab.generate(model, params).images
    cached = sdlab.generate(model, params.replace(deepcache=2)).images
    uncontrolled = sdlab.generate(model, params.replace(deepcache=2, control=())).images
    assert _max_diff(full, cached) < _max_diff(uncontrolled, cached)  # control still steers the cached steps
    base, refiner = sdlab.load(sdxl_folder), sdlab.load(_save_model(tmp_path_factory, TINY_SDXL_REFINER, "ref"))
    xl = _params(_controlnet(TINY_SDXL, 1)).replace(refiner_switch_at=0.6)
    refined = sdlab.generate(base, xl, refiner=refiner).images
    assert _max_diff(refined, sdlab.generate(base, xl.replace(control=()), refiner=refiner).images) > 2


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit, message", [
    ({"scale": -1.0}, "scale must be a number"),
    ({"start": 0.8, "end": 0.2}, "is after end"),
    ({"mode": "loud"}, "unknown control mode"),
    ({"resize_mode": "Stretch"}, "Just Resize"),
    ({"image": "edges.png"}, "must be a PIL image or a tensor"),
], ids=["scale", "window", "mode", "resize", "image"])  # fmt: skip
def test_bad_units_are_refused_before_any_model_work(unit, message):
    params = _params(_controlnet(TINY, 1)).replace(control=(ControlUnit(**{"net": _controlnet(TINY, 1),
                                                                           "image": _image(1), **unit}),))
    with pytest.raises(ParameterError, match=message):
        params.resolved(TINY)


def test_a_controlnet_of_another_family_is_refused():
    params = _params(_controlnet(TINY_SDXL, 1))
    with pytest.raises(ParameterError, match=r"ControlNet is for .* but the model 'tiny'"):
        params.resolved(TINY)
    adapter = T2IAdapter(T2IAdapterConfig(channels=(64, 128), num_res_blocks=1, downscale_factor=2))
    with pytest.raises(ParameterError, match="T2I-Adapter's feature widths"):
        _params(adapter).resolved(TINY)


def test_a_control_tensor_of_the_wrong_size_says_what_fits(folder):
    model = sdlab.load(folder)
    params = _params(_controlnet(TINY, 1)).replace(
        control=(ControlUnit(_controlnet(TINY, 1), torch.rand(1, 3, 32, 32)),))
    with pytest.raises(ParameterError, match=r"shape \(1 or 1, 3, 64, 64\)"):
        sdlab.generate(model, params)


def test_a_control_image_of_another_size_or_mode_is_resized():
    net = _controlnet(TINY, 1)
    small_grey = _image(1, size=40).convert("L")
    cond, _ = ControlUnit(net, small_grey).bind(2, 64, 48, torch.tensor([1.0, 0.0]), False, "cpu", torch.float32)
    assert cond.inputs[0].shape == (2, 3, 48, 64) and 0 <= cond.inputs[0].min() and cond.inputs[0].max() <= 1
