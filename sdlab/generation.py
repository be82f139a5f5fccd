"""Generation: txt2img, img2img and inpainting as one denoising loop.

    model = sdlab.load("path/to/model")
    result = sdlab.generate(model, GenerationParams(prompt="a red circle above a blue square", seed=1))
    result.images[0].save("out.png")

The modes differ only in where the loop starts and what the denoiser sees (see ../shared/DESIGN.md):
- txt2img: x = noise at the top of the schedule;
- img2img: the schedule is cut to its last `strength` fraction and x = the image's latent noised to its
  first sigma;
- inpainting: a 9-channel model gets mask + masked-image latents as extra input channels; an ordinary
  model is wrapped in `MaskedDenoiser`, which keeps the unmasked region on the original image's path.

Random numbers are drawn in the order diffusers' pipelines draw them (image latents, then the initial
noise, then the masked image's latents, then the sampler's noise), so the same generator gives the same
image.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import rng
from .deepcache import DeepCacheUNet
from .diffusion.denoisers import GuidedDenoiser, MaskedDenoiser, ModelDenoiser, SwitchingDenoiser
from .diffusion.registry import SamplerSpec, get_sampler, with_options
from .diffusion.samplers import SamplingInterrupted
from .diffusion.schedules import NoiseSchedule, ve_to_vp, vp_to_ve
from .errors import ParameterError, SdlabError
from .families import family_of, latent_format
from .images import to_mask, to_pil, to_pixels
from .interrupts import abort_between_blocks
from .lora import LoRASource, apply_lora
from .params import DEFAULT_REFINER_SWITCH, GenerationParams
from .prompts import extract_lora_tags
from .tome import token_merging

log = logging.getLogger(__name__)


class NumericalError(SdlabError):
    """NaN or infinity appeared during generation (often fp16 overflow: try fp32 or bf16)."""


@dataclass
class GenerationResult:
    images: list  # PIL images (none when the run stopped part-way through the schedule: `denoising_end`)
    params: GenerationParams  # resolved: size and seed filled in
    latents: torch.Tensor  # (B, 4, h, w): the (scaled) DDPM latents at noise level `sigma` (0: the final ones)
    interrupted: bool = False
    sigma: float = 0.0  # > 0 when `denoising_end` stopped the run before the end of the schedule


@dataclass
class StepInfo:
    """What a step callback receives. `denoised` is the current x0 estimate (B, 4, h, w), scaled latents:
    `decode_latents(model, info.denoised)` turns it into preview images."""

    step: int  # 1-based count of finished steps
    total: int
    sigma: float
    denoised: torch.Tensor


@torch.no_grad()
def generate(model, params: GenerationParams, *, generator: rng.Generator = None,
             callback: Callable[[StepInfo], None] | None = None,
             interrupt: Callable[[], bool] | None = None, abort: Callable[[], bool] | None = None,
             named_loras: Mapping[str, LoRASource] | None = None, refiner=None) -> GenerationResult:
    """Generate `params.batch_size` images. Image i uses seed `params.seed + i` unless `generator` is given
    (a torch.Generator or a list, one per image, as diffusers takes them).

    `refiner` (a Model, e.g. the SDXL refiner) takes over the sampling run once `params.refiner_switch_at`
    (default 0.8) of the schedule is done, as A1111's `refiner_checkpoint` / `refiner_switch_at` do.

    Stopping part-way: `interrupt()` is asked before every sampler step; True ends sampling, and the latest
    x0 estimate is decoded (`result.interrupted`). `abort()` is asked as every module of every network is
    entered (text encoder, UNet, VAE); True raises `sdlab.interrupts.GenerationAborted` at the next one.

    LoRAs are merged into the weights for this call and restored afterwards: those of `params.loras` (files
    or state dicts, used as given) and those that `<lora:name:weight>` tags in the prompt name, looked up in
    `named_loras` (name -> file or state dict). sdlab never turns a name into a path by itself: the caller
    decides which files a name may mean (`sdlab.resources.ResourceFolder` looks names up in folders, as the
    CLI's and the server's `--lora-dir` do)."""
    params = params.resolved(model.config)
    prompt, tags = extract_lora_tags(params.prompt)
    prompt_2 = None
    if params.prompt_2 is not None:  # its tags merge LoRAs too (into the whole model); one named in both, once
        prompt_2, tags_2 = extract_lora_tags(params.prompt_2)
        named = {name for name, _ in tags}
        tags += [tag for tag in tags_2 if tag[0] not in named]
    loras = [*params.loras, *((_named_lora(name, named_loras), weight) for name, weight in tags)]
    n = params.batch_size
    if generator is None:
        generator = rng.generators(params.seeds)
    with ExitStack() as merged:
        for source, weight in loras:
            merged.enter_context(apply_lora(model, source, weight))
        return sample_batch(model, [prompt] * n, [params.negative_prompt] * n, params, generator,
                            callback=callback, interrupt=interrupt, abort=abort, refiner=refiner,
                            prompts_2=_each(prompt_2, n), negatives_2=_each(params.negative_prompt_2, n))


def _each(text: str | None, n: int) -> list[str] | None:
    return None if text is None else [text] * n


def _named_lora(name: str, named_loras: Mapping[str, LoRASource] | None) -> LoRASource:
    if named_loras is None:
        raise ParameterError(
            f"the prompt names LoRA {name!r} (<lora:{name}:...>), but generate() was given no named LoRAs: pass "
            f"named_loras={{{name!r}: path}} or sdlab.resources.ResourceFolder('LoRA', [folder], LORA_SUFFIXES)")
    try:
        return named_loras[name]
    except ParameterError:  # the mapping's own words (a ResourceFolder: an invalid or unknown name)
        raise
    except KeyError:
        raise ParameterError(f"the prompt names LoRA {name!r}, which is not among the {len(named_loras)} "
                             f"named LoRAs given") from None


@torch.no_grad()
def sample_batch(model, prompts: list[str], negatives: list[str], params: GenerationParams,
                 generator: rng.Generator, *, callback=None, interrupt=None, abort=None, refiner=None,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 init_latents: torch.Tensor | None = None, zero_empty_negatives: bool | None = None,
                 prompts_2: list[str] | None = None, negatives_2: list[str] | None = None) -> GenerationResult:
    """The loop behind `generate`, for one batch of (prompt, negative prompt) pairs; `params` resolved.
    `prompts_2` / `negatives_2` are the second text encoder's texts, one per image (SDXL's bigG; None: the
    same as `prompts` / `negatives`); they take the place of `params.prompt_2` / `negative_prompt_2`.

    diffusers' "ensemble of experts" (the drop-in SDXL pipelines use these): `denoising_end` (a fraction of
    the training timesteps) stops the run after the steps whose timestep is at least
    round(T - denoising_end * T) and returns the latents at that noise level without decoding;
    `denoising_start` runs only the steps below round(T - denoising_start * T), starting from
    `init_latents` as they are (the latents such a run returned). `init_latents` (B or 1, 4, h, w) without
    `denoising_start` stand for an image's latents (img2img: noised to the first step's level, as an encoded
    image would be). `zero_empty_negatives` overrides the family's rule for empty negative prompts (SDXL
    base: zeros; diffusers encodes a negative prompt given as "")."""
    networks = [*model.components.values(), model.tiny_decoder, *(unit.net for unit in params.control)]
    if refiner is not None:
        networks += refiner.components.values()
    with abort_between_blocks(networks, abort):
        texts = _Texts(list(prompts), list(negatives), prompts_2, negatives_2)
        return _sample_batch(model, texts, params, generator, callback, interrupt, refiner,
                             _Window(denoising_start, denoising_end), init_latents, zero_empty_negatives)


@dataclass(frozen=True)
class _Texts:
    """A batch's texts, one per image: prompts and negative prompts, and the second text encoder's (None:
    the same as the first)."""

    prompts: list[str]
    negatives: list[str]
    prompts_2: list[str] | None = None
    negatives_2: list[str] | None = None


@dataclass(frozen=True)
class _Window:
    """The part of the schedule a run covers, as diffusers' denoising_start / denoising_end fractions."""

    start: float | None = None
    end: float | None = None

    def steps(self, schedule: NoiseSchedule, sigmas: torch.Tensor, first: int) -> tuple[int, int]:
        """(first, last) step indices into `sigmas` (N + 1 levels for N steps) the run goes from and to."""
        last = len(sigmas) - 1
        if self.start is None and self.end is None:
            return first, last
        timesteps = schedule.sigma_to_t(sigmas[:-1]).double().round(decimals=4)  # diffusers' t of each step
        total = schedule.num_timesteps
        if self.start is not None:
            below = int((timesteps < int(round(total - self.start * total))).sum())
            first = last - below
        if self.end is not None:
            last = max(int((timesteps >= int(round(total - self.end * total))).sum()), first)
        return first, last


def run_window(model, params: GenerationParams, denoising_start: float | None = None,
               denoising_end: float | None = None) -> tuple[float, float]:
    """(the noise level a run starts at, the one it stops at) for resolved `params` and diffusers'
    denoising_start / denoising_end fractions (see `sample_batch`)."""
    schedule, sigmas = _schedule(model, params, _sampler(params))
    first, last = _Window(denoising_start, denoising_end).steps(schedule, sigmas, _first_step(params, params.mode))
    return float(sigmas[first]), float(sigmas[last])


def _schedule(model, params: GenerationParams, spec: SamplerSpec) -> tuple[NoiseSchedule, torch.Tensor]:
    """The model's training noise schedule and the run's sigmas (steps + 1 levels, the last 0 or sigma_min)."""
    train = model.config.schedule
    schedule = NoiseSchedule.from_config(train)
    sigmas = spec.make_sigmas(schedule, params.steps, schedule=params.schedule.lower(),
                              spacing=train.timestep_spacing, steps_offset=train.steps_offset)
    return schedule, sigmas


def _sample_batch(model, texts, params, generator, callback, interrupt, refiner, window, init_latents,
                  zero_empty_negatives) -> GenerationResult:
    spec = _sampler(params)
    schedule, sigmas = _schedule(model, params, spec)
    image_mode = params.mode if init_latents is None else "img2img"
    start, end = window.steps(schedule, sigmas, _first_step(params, image_mode))
    unet = model.unet if params.deepcache == 1 else DeepCacheUNet(model.unet, params.deepcache)
    denoiser = ModelDenoiser(unet, schedule, model.config.prediction, quantize=spec.quantize(params.schedule))
    cond, uncond = _conditionings(model, texts, params, zero_empty_negatives)
    cond, uncond = _with_control(model, params, cond, uncond, sigmas[start:end + 1])
    if window.start is not None and init_latents is not None:  # continue a run that stopped at sigmas[start]
        x = vp_to_ve(_batch_of(init_latents, len(cond)).to(model.device, model.dtype), sigmas[start])
        denoiser = _guided(denoiser, cond, uncond, params)
    else:
        x, denoiser = _start(model, params, image_mode, denoiser, cond, uncond, spec, sigmas, start, generator,
                             init_latents)
    if refiner is not None:
        denoiser = _with_refiner(model, refiner, denoiser, texts, params, spec, schedule)
    sigmas = sigmas[start:end + 1]
    watcher = _StepWatcher(params, len(sigmas) - 1, callback)
    interrupted = False
    try:
        if len(sigmas) > 1:
            with _denoising_stage(model, refiner), token_merging(model.unet, params.token_merging):
                x = spec.sample(denoiser, x, sigmas, generator=generator, callback=watcher, interrupt=interrupt)
    except SamplingInterrupted as stop:
        x, interrupted = (stop.denoised if stop.denoised is not None else stop.x), True
    sigma = 0.0 if interrupted else float(sigmas[-1])
    latents = ve_to_vp(x, sigma)
    _check_finite(latents, "the final latents")
    if window.end is not None and sigma > 0 and end < params.steps and not interrupted:
        return GenerationResult([], params, latents, interrupted, sigma)  # a later run continues from here
    decoder = refiner if isinstance(denoiser, SwitchingDenoiser) and denoiser.switched else model
    images = decode_latents(decoder, latents)
    return GenerationResult(images, params, latents, interrupted)


@contextmanager
def _denoising_stage(model, refiner):
    """The sampling loop's networks in memory (low-memory models): the UNet, and the refiner's."""
    with model.using("unet"), (refiner.using("unet") if refiner is not None else nullcontext()):
        yield


def check_refiner(config, refiner_config, params: GenerationParams) -> GenerationParams:
    """Raise ParameterError unless a model of `refiner_config` can finish runs of `config` with `params`
    (checked before any model work: the server calls it when it admits a request); return `params`
    resolved for the refiner."""
    if params.mode == "inpaint":
        raise ParameterError("a refiner is not supported for inpainting yet; refine the inpainted image with "
                             "img2img instead")
    mine, theirs = latent_format(config), latent_format(refiner_config)
    if mine != theirs:
        raise ParameterError(
            f"the refiner {refiner_config.name!r} works on other latents ({theirs}) than the model "
            f"{config.name!r} ({mine}); pick a refiner of the same family")
    # Its own limits (clip skip) hold too; control units steer the base only.
    return params.replace(control=()).resolved(refiner_config)


def _with_refiner(model, refiner, denoiser, texts, params, spec, schedule) -> SwitchingDenoiser:
    """The base's denoiser, then the refiner's (its own conditioner and time ids) from the switch on. (The
    SDXL refiner's one encoder is bigG: it encodes the second prompts, as the base's bigG does.)"""
    refiner_params = check_refiner(model.config, refiner.config, params)
    r_schedule = NoiseSchedule.from_config(refiner.config.schedule)
    r_denoiser = ModelDenoiser(refiner.unet, r_schedule, refiner.config.prediction,
                               quantize=spec.quantize(params.schedule))
    cond, uncond = _conditionings(refiner, texts, refiner_params, None)
    guided = _guided(r_denoiser, cond, uncond, params)
    switch_at = params.refiner_switch_at if params.refiner_switch_at is not None else DEFAULT_REFINER_SWITCH
    return SwitchingDenoiser(denoiser, guided, schedule, switch_at)


def _guided(denoiser: ModelDenoiser, cond, uncond, params: GenerationParams) -> GuidedDenoiser:
    """`denoiser` with the conditioning bound and the request's classifier-free guidance."""
    return GuidedDenoiser(denoiser, cond, uncond, params.cfg_scale, rescale=params.guidance_rescale)


def _batch_of(latents: torch.Tensor, n: int) -> torch.Tensor:
    if latents.ndim != 4 or latents.shape[0] not in (1, n):
        raise ParameterError(f"init_latents must be (1 or {n}, C, h, w); got {tuple(latents.shape)}")
    return latents.expand(n, -1, -1, -1)


def _sampler(params: GenerationParams) -> SamplerSpec:
    spec = get_sampler(params.sampler)
    if params.eta is not None:
        if "eta" not in inspect.signature(spec.sample).parameters:
            log.warning("sampler %s has no eta; ignoring eta=%s", spec.label, params.eta)
        else:
            spec = with_options(spec, eta=params.eta)
    return spec


def _first_step(params: GenerationParams, mode: str) -> int:
    """img2img runs the last `strength` fraction of the schedule (diffusers' rule: int(steps * strength))."""
    if mode == "txt2img":
        return 0
    return params.steps - min(int(params.steps * params.strength), params.steps)


def _conditionings(model, texts: _Texts, params, zero_empty_negatives=None):
    """(cond, uncond) Conditionings from the family's conditioner (one call for both); uncond is None when
    guidance is off (scale 1)."""
    guided = params.cfg_scale != 1.0
    with model.using(*model.text_encoder_names):
        cond, uncond = family_of(model.config).condition(
            model, texts.prompts, texts.negatives if guided else None, params, prompts_2=texts.prompts_2,
            negatives_2=texts.negatives_2 if guided else None, zero_empty_negatives=zero_empty_negatives)
    _check_finite(cond.context, "the text encoder's output")
    return cond, uncond


def _with_control(model, params, cond, uncond, run_sigmas):
    """cond and uncond with the request's control units bound to them (each unit's step window is over the
    steps this run takes: for img2img, the last `strength` fraction, as diffusers counts them)."""
    if not params.control:
        return cond, uncond
    bound = [unit.bind(len(cond), params.width, params.height, run_sigmas, uncond is not None, model.device,
                       model.dtype) for unit in params.control]
    cond = cond.replace(control=tuple(c for c, _ in bound))
    if uncond is not None:
        uncond = uncond.replace(control=tuple(u for _, u in bound))
    return cond, uncond


def _start(model, params, mode, denoiser, cond, uncond, spec, sigmas, start, generator, init_latents):
    """The initial x (B, 4, h, w) at sigmas[start] and the denoiser the loop calls."""
    f = model.config.vae.downscale
    shape = (len(cond), latent_format(model.config).channels, params.height // f, params.width // f)
    if mode == "txt2img":
        x = rng.randn(shape, generator, device=model.device, dtype=model.dtype) * _initial_scale(model, spec, sigmas)
        return x, _guided(denoiser, cond, uncond, params)
    if init_latents is not None:  # an image given as its latents (diffusers' img2img takes them as `image`)
        image_latents = _batch_of(init_latents, shape[0]).to(model.device, model.dtype)
        noise = rng.randn(image_latents.shape, generator, device=model.device, dtype=model.dtype)
        x = image_latents + noise * sigmas[start]
        return x, _guided(denoiser, cond, uncond, params)
    return _start_from_image(model, params, denoiser, cond, uncond, spec, sigmas, start, generator, shape)


def _start_from_image(model, params, denoiser, cond, uncond, spec, sigmas, start, generator, shape):
    """img2img and inpainting. Draws: image latents (when used), initial noise, masked-image latents."""
    n = shape[0]
    pixels = to_pixels(params.init_image, params.width, params.height).to(model.device, model.dtype)
    blend = params.mode == "inpaint" and not model.config.is_inpainting  # an ordinary model inpaints by blending
    image_latents = None
    if params.mode == "img2img" or blend or start > 0:
        image_latents = encode_image(model, pixels, n, generator)
    noise = rng.randn(shape, generator, device=model.device, dtype=model.dtype)
    if start == 0 and params.mode != "img2img":
        x = noise * _initial_scale(model, spec, sigmas)  # strength 1: pure noise, as txt2img
    else:
        x = image_latents + noise * sigmas[start]  # the image's latent noised to the first sigma
    concat = latent_mask = None
    if params.mode == "inpaint":
        mask = to_mask(params.mask, params.width, params.height).to(model.device, model.dtype)  # (1, 1, H, W)
        latent_mask = F.interpolate(mask, size=shape[2:])  # (1, 1, h, w), nearest, as the reference
        if model.config.is_inpainting:
            masked = encode_image(model, pixels * (mask < 0.5), n, generator)
            concat = torch.cat([latent_mask.expand(n, -1, -1, -1), masked], dim=1)  # (B, 5, h, w)
    if concat is not None:  # the same extra channels for the conditional and the unconditional pass
        cond = cond.replace(concat=concat)
        uncond = None if uncond is None else uncond.replace(concat=concat)
    guided = _guided(denoiser, cond, uncond, params)
    if blend:
        return x, MaskedDenoiser(guided, image_latents, latent_mask, noise)
    return x, guided


def _initial_scale(model, spec: SamplerSpec, sigmas: torch.Tensor) -> float:
    return spec.initial_noise_scale(sigmas, model.config.schedule.timestep_spacing)


def encode_image(model, pixels: torch.Tensor, batch: int, generator: rng.Generator) -> torch.Tensor:
    """One image (1, 3, H, W) in [-1, 1] -> `batch` scaled latents (B, 4, h, w), sampled from the VAE's
    posterior. With one generator the sample is drawn once and repeated (as diffusers does); with a list,
    each image draws its own from its generator."""
    with model.using("vae"), _vae_precision(model) as dtype:
        mean, logvar = model.vae.encode(pixels.to(dtype))
        mean, logvar = mean.to(model.dtype), logvar.to(model.dtype)
    if isinstance(generator, (list, tuple)):
        mean, logvar = mean.expand(batch, -1, -1, -1), logvar.expand(batch, -1, -1, -1)
    z = mean + (0.5 * logvar).exp() * rng.randn_like(mean, generator)
    return latent_format(model.config).to_diffusion(z).expand(batch, -1, -1, -1)


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor) -> list:
    """Scaled latents (B, 4, h, w) -> B PIL images."""
    if model.tiny_decoder is not None:  # TAESD decodes the UNet's latents as they are
        pixels = model.tiny_decoder(latents.to(next(model.tiny_decoder.parameters()).dtype))
    else:
        with model.using("vae"), _vae_precision(model) as dtype:
            pixels = model.vae.decode(latent_format(model.config).from_diffusion(latents.to(dtype)))
    _check_finite(pixels, "the VAE decoder's output")
    return to_pil(pixels)


@contextmanager
def _vae_precision(model):
    """The dtype the VAE runs in: the model's, except fp32 for an fp16 model whose VAE config asks for
    `force_upcast` (SDXL's VAE overflows in fp16; diffusers' SDXL pipelines upcast it the same way). The VAE
    is cast for the call and back afterwards."""
    vae = model.vae
    # (A low-memory model's packed layers hold the file's dtype until their first call: ask the model.)
    dtype = model.dtype if model.residency is not None else next(vae.parameters()).dtype
    if not (dtype == torch.float16 and model.config.vae.force_upcast):
        yield dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(dtype)


class _StepWatcher:
    """The samplers' per-step callback: checks for NaN and forwards a StepInfo to the user's callback."""

    def __init__(self, params: GenerationParams, total: int, callback):
        self.params, self.total, self.callback = params, total, callback

    def __call__(self, info: dict) -> None:
        denoised = info["denoised"]
        _check_finite(denoised, f"step {info['step'] + 1} of {self.total} (sampler {self.params.sampler})")
        if self.callback is not None:
            self.callback(StepInfo(info["step"] + 1, self.total, float(info["sigma"]), denoised))


def _check_finite(x: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(
            f"NaN or infinity in the latents at {stage}; in fp16 this is usually overflow: "
            "try dtype=torch.float32 or torch.bfloat16, or a lower CFG scale")
