"""A diffusers-style front door: the example code users already have runs with only the import changed.

    from sdlab import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", torch_dtype=torch.float32)
    image = pipe("a photo of an astronaut", num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]

    from sdlab import StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline   # SDXL base + refiner
    base = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained("stabilityai/stable-diffusion-xl-refiner-1.0",
                                                               text_encoder_2=base.text_encoder_2, vae=base.vae)
    latents = base(prompt, num_inference_steps=40, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, num_inference_steps=40, denoising_start=0.8, image=latents).images[0]

Everything is delegated to `sdlab.generation.sample_batch`. Differences from diffusers' semantics are
noted where they exist: `clip_skip` counts skipped layers as diffusers does (sdlab's own API uses
A1111's convention, skipped + 1), and applies to the negative prompt too (diffusers' SDXL pipelines encode
the negative prompt from the penultimate layer whatever clip_skip says); prompts longer than 75 tokens are
chunked (A1111) instead of truncated. The sampler is the model folder's scheduler unless `pipe.sampler` is
set to any name of `sdlab.diffusion.registry` (e.g. "DPM++ 2M" with `pipe.schedule = "karras"`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import families
from .diffusion.registry import get_sampler
from .diffusion.schedules import ve_to_vp, vp_to_ve
from .errors import CheckpointError, ParameterError
from .generation import run_window, sample_batch
from .model import Model
from .params import GenerationParams

# diffusers scheduler class -> sdlab sampler label (what `from_pretrained` picks by default).
SCHEDULER_SAMPLERS = {
    "PNDMScheduler": "PLMS", "DDIMScheduler": "DDIM", "DDPMScheduler": "DDPM", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE", "UniPCMultistepScheduler": "UniPC", "LCMScheduler": "LCM",
    "TCDScheduler": "TCD",
}  # fmt: skip
# The samplers whose diffusers scheduler's step takes the pipeline's `eta` (DDIM's eta, TCD's gamma).
ETA_SAMPLERS = ("DDIM", "TCD")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
AESTHETICS_FLAG = "requires_aesthetics_score"  # the SDXL refiner's pipeline config (model_index.json)
ZEROS_FLAG = "force_zeros_for_empty_prompt"  # the SDXL base's: a negative prompt left out conditions on zeros


@dataclass
class PipelineOutput:
    images: list | np.ndarray | torch.Tensor  # PIL images; (B, H, W, 3) / (B, 3, H, W) in [0, 1]; latents


class StableDiffusionPipeline:
    """txt2img; `image=` makes it img2img and `mask_image=` inpainting, as diffusers' three pipelines."""

    default_strength = 0.8
    default_guidance = 7.5

    def __init__(self, model: Model, sampler: str = "PLMS", schedule: str = "automatic"):
        self.model, self.sampler, self.schedule = model, sampler, schedule

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, use_safetensors: bool | None = None, plain: bool = False,
                        quantize: str | None = None, **components) -> StableDiffusionPipeline:
        """A local diffusers folder, a single checkpoint file, or a Hugging Face model id found in the local
        cache (or downloaded with `huggingface_hub` where a network exists). Networks given by name (e.g.
        `text_encoder_2=base.text_encoder_2, vae=base.vae`, as diffusers' refiner example shares them) replace
        the loaded ones; they must be sdlab networks of the same config. (sdlab reads `.safetensors` before
        `.bin` and `.bin` files only with its safe reader, whatever `use_safetensors` says.) The networks come
        on sdlab's fast path, as `sdlab.load` gives them; `plain=True` (sdlab's own option) keeps them plain, and
        `quantize="int8"` (sdlab's own too) computes the UNet in int8, as `sdlab.load`'s option does."""
        model, sampler = _load(path_or_id, torch_dtype, variant, components, plain, quantize)
        return cls(model, sampler=sampler)

    from_single_file = from_pretrained

    def __getattr__(self, name: str):
        """The model's networks and tokenizers as diffusers names them: `pipe.unet`, `pipe.text_encoder_2`..."""
        model = self.__dict__.get("model")
        if model is not None and name in model.components:
            return model.components[name]
        if model is not None and name in model.tokenizers:
            return model.tokenizers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to(self, device=None, dtype=None) -> StableDiffusionPipeline:
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 image=None, mask_image=None, strength: float | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, generator=None, eta: float = 0.0,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end=None,
                 output_type: str = "pil", control: tuple = (), **_ignored) -> PipelineOutput:
        """diffusers' arguments; `control` (sdlab's own) takes `sdlab.control.ControlUnit`s, as the ControlNet
        pipelines pass them."""
        return self._run(prompt, negative_prompt or "", image=image, mask_image=mask_image, strength=strength,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                         width=width, num_images_per_prompt=num_images_per_prompt, generator=generator, eta=eta,
                         guidance_rescale=guidance_rescale, clip_skip=clip_skip, output_type=output_type,
                         callback_on_step_end=callback_on_step_end, control=tuple(control))

    def _run(self, prompt, negative_prompt, *, image, mask_image, strength, num_inference_steps, guidance_scale,
             height, width, num_images_per_prompt, generator, eta, guidance_rescale, clip_skip, output_type,
             callback_on_step_end, denoising_start=None, denoising_end=None, zero_empty_negatives=None,
             prompt_2=None, negative_prompt_2=None, **conditions) -> PipelineOutput:
        """The one call behind every pipeline class. `image` may be a PIL image or latents (B, 4, h, w), as
        diffusers' img2img pipelines take the output of a pipeline run with output_type="latent".
        `prompt_2` / `negative_prompt_2` (a string for every prompt, or one per prompt; None: the first
        prompts) are the second text encoder's."""
        if output_type not in OUTPUT_TYPES:
            raise ParameterError(f"output_type={output_type!r}; use one of {OUTPUT_TYPES}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _broadcast(negative_prompt, len(prompts), "negative_prompt")
        prompts_2 = None if prompt_2 is None else _broadcast(prompt_2, len(prompts), "prompt_2")
        negatives_2 = None if negative_prompt_2 is None else _broadcast(negative_prompt_2, len(prompts),
                                                                        "negative_prompt_2")
        latents_in = image if isinstance(image, torch.Tensor) else None
        if denoising_start is not None and latents_in is None:
            raise ParameterError("denoising_start continues a run from its latents: pass image=<the latents a "
                                 "pipeline returned with output_type='latent'>; to start from a picture, use "
                                 "strength instead")
        if latents_in is not None:
            height, width = (side * self.model.config.vae.downscale for side in latents_in.shape[-2:])
        params = GenerationParams(
            prompt=prompts[0], negative_prompt=negatives[0], prompt_2=_first(prompts_2),
            negative_prompt_2=_first(negatives_2), width=width, height=height,
            steps=num_inference_steps, sampler=self.sampler, schedule=self.schedule,
            cfg_scale=_cfg_scale(self.default_guidance if guidance_scale is None else guidance_scale),
            guidance_rescale=guidance_rescale, clip_skip=(clip_skip or 0) + 1,
            init_image=None if latents_in is not None else image,
            strength=strength if strength is not None else self._strength(mask_image), mask=mask_image,
            eta=eta if get_sampler(self.sampler).label in ETA_SAMPLERS else None, seed=0,
            batch_size=len(prompts) * num_images_per_prompt, **conditions,
        ).resolved(self.model.config)
        # diffusers' batch order: each prompt repeated num_images_per_prompt times.
        prompts, negatives, prompts_2, negatives_2 = (
            None if texts is None else [t for t in texts for _ in range(num_images_per_prompt)]
            for texts in (prompts, negatives, prompts_2, negatives_2))
        if generator is None:
            generator = torch.Generator().manual_seed(torch.seed() % 2**32)
        carries_ve = get_sampler(self.sampler).style == "k"  # diffusers' k-diffusion ports hold x0 + sigma eps
        if latents_in is not None and denoising_start is not None and carries_ve:
            latents_in = ve_to_vp(latents_in, run_window(self.model, params, denoising_start)[0])
        callback = _step_end_adapter(self, callback_on_step_end)
        result = sample_batch(self.model, prompts, negatives, params, generator, callback=callback,
                              denoising_start=denoising_start, denoising_end=denoising_end,
                              init_latents=latents_in, zero_empty_negatives=zero_empty_negatives,
                              prompts_2=prompts_2, negatives_2=negatives_2)
        if output_type == "latent":
            latents = result.latents
            return PipelineOutput(vp_to_ve(latents, result.sigma) if carries_ve else latents)
        images = result.images
        if output_type == "pil":
            return PipelineOutput(images)
        array = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])  # (B, H, W, 3)
        return PipelineOutput(array if output_type == "np" else torch.from_numpy(array).permute(0, 3, 1, 2))

    def _strength(self, mask_image) -> float:
        return 1.0 if mask_image is not None else self.default_strength


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    default_strength = 0.8


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    default_strength = 1.0


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL txt2img (diffusers' defaults: guidance 5, size conditions from the image size, zeros for a
    negative prompt not given); `denoising_end` with output_type="latent" hands the rest of the schedule
    to a refiner pipeline's `denoising_start`."""

    default_guidance = 5.0
    default_strength = 0.3
    aesthetic_pipeline = False  # whether negative time ids take the negative crop (the img2img/inpaint rule)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], prompt_2: str | list[str] | None = None, *,
                 image=None, mask_image=None, strength: float | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, denoising_start: float | None = None,
                 denoising_end: float | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, output_type: str = "pil",
                 guidance_rescale: float = 0.0, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                 negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 callback_on_step_end=None, control: tuple = (), **_ignored) -> PipelineOutput:
        prompt_2, negative_prompt_2 = self._second_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        conditions = self._size_conditions(original_size, crops_coords_top_left, target_size,
                                           negative_original_size, negative_crops_coords_top_left,
                                           negative_target_size)
        return self._run(prompt, "" if negative_prompt is None else negative_prompt, image=image,
                         mask_image=mask_image, strength=strength, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, eta=eta,
                         guidance_rescale=guidance_rescale, clip_skip=clip_skip, output_type=output_type,
                         callback_on_step_end=callback_on_step_end, denoising_start=denoising_start,
                         denoising_end=denoising_end,
                         # diffusers zeroes only a negative prompt that was not given (force_zeros_for_empty_prompt)
                         zero_empty_negatives=None if negative_prompt is None else False,
                         prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, aesthetic_score=aesthetic_score,
                         negative_aesthetic_score=negative_aesthetic_score, control=tuple(control),
                         **conditions)

    def _second_prompts(self, prompt, prompt_2, negative_prompt, negative_prompt_2):
        """(prompt_2, negative_prompt_2) as diffusers' encode_prompt uses them: a second prompt left out or
        empty is the first; a negative prompt left out is zeros when the pipeline's config forces zeros for
        it (negative_prompt_2 then unused). diffusers zips [prompt, prompt_2] with the encoders it has, so a
        pipeline without the first (the refiner) encodes prompt and ignores prompt_2: (None, None)."""
        if "text_encoder" not in self.model.components:
            return None, None
        config = self.model.config
        zeros = families.family_of(config).model_index_extras(config).get(ZEROS_FLAG, False)
        if negative_prompt is None and zeros:
            return prompt_2 or prompt, None
        return prompt_2 or prompt, negative_prompt_2 or negative_prompt or ""

    def _size_conditions(self, original, crop, target, negative_original, negative_crop, negative_target):
        """GenerationParams' size conditions as diffusers' pipeline class fills them in."""
        own = {"original_size": original, "crops_coords_top_left": tuple(crop), "target_size": target}
        if self.aesthetic_pipeline:  # img2img / inpaint: each negative size defaults to the positive one
            refiner = families.family_of(self.model.config).model_index_extras(self.model.config)
            crop_of_negative = tuple(negative_crop) if refiner.get(AESTHETICS_FLAG) else None
            return {**own, "negative_original_size": negative_original, "negative_target_size": negative_target,
                    "negative_crops_coords_top_left": crop_of_negative}
        if negative_original is not None and negative_target is not None:  # txt2img: both, or the positive ids
            return {**own, "negative_original_size": negative_original, "negative_target_size": negative_target,
                    "negative_crops_coords_top_left": tuple(negative_crop)}
        return own


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """SDXL img2img, and the refiner's pipeline (`denoising_start` continues a base run's latents)."""

    default_strength = 0.3
    aesthetic_pipeline = True


class StableDiffusionXLInpaintPipeline(StableDiffusionXLPipeline):
    """SDXL inpainting (9-channel models, or any SDXL model by blending); images are resized to the model's
    native size unless height/width are given, as diffusers does."""

    default_strength = 0.9999  # diffusers' default: the first step is skipped, the image's latents noised
    default_guidance = 7.5
    aesthetic_pipeline = True

    def __call__(self, prompt, prompt_2=None, *, height=None, width=None, **kwargs) -> PipelineOutput:
        size = self.model.config.default_size
        return super().__call__(prompt, prompt_2, height=height or size, width=width or size, **kwargs)

    def _strength(self, mask_image) -> float:
        return self.default_strength


class DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained(path)`: the pipeline class the model's family uses in diffusers.
    diffusers' AutoPipelines below pick the class for a task instead."""

    task: str | None = None  # None: the folder's own class; else the family's class for this task

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, use_safetensors: bool | None = None, plain: bool = False,
                        quantize: str | None = None, **components) -> StableDiffusionPipeline:
        model, sampler = _load(path_or_id, torch_dtype, variant, components, plain, quantize)
        family = families.family_of(model.config)
        name = family.pipeline_class(model.config) if cls.task is None else family.task_pipelines[cls.task]
        return PIPELINE_CLASSES[name](model, sampler=sampler)


class AutoPipelineForText2Image(DiffusionPipeline):
    """diffusers' `AutoPipelineForText2Image`: the model's text-to-image pipeline (as SD-Turbo's examples load it)."""

    task = "text2image"


class AutoPipelineForImage2Image(DiffusionPipeline):
    """diffusers' `AutoPipelineForImage2Image`: the model's image-to-image pipeline."""

    task = "image2image"


class AutoPipelineForInpainting(DiffusionPipeline):
    """diffusers' `AutoPipelineForInpainting`: the model's inpainting pipeline."""

    task = "inpainting"


PIPELINE_CLASSES = {cls.__name__: cls for cls in (
    StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)}


def _load(path_or_id, torch_dtype, variant, components: dict, plain: bool, quantize: str | None,
          ) -> tuple[Model, str]:
    """(the model, the sampler of its folder's scheduler) behind every `from_pretrained`."""
    path = resolve_model_path(path_or_id)
    model = Model.load(path, variant=variant, dtype=torch_dtype or torch.float32, plain=plain, quantize=quantize)
    _share_components(model, components)
    return model, _folder_sampler(path, model)


def _share_components(model: Model, components: dict) -> None:
    """Replace the model's networks by the ones given by name (diffusers' component keyword arguments)."""
    for name, network in components.items():
        if name not in model.components:
            continue  # diffusers options sdlab has no use for (safety_checker=None, low_cpu_mem_usage=...)
        if network is None or getattr(network, "cfg", None) != model.config.network(name):
            raise ParameterError(f"{name}= must be an sdlab network of the same config as the model's {name} "
                                 f"(e.g. another sdlab pipeline's pipe.{name})")
        model.components[name] = network


def _cfg_scale(guidance_scale: float) -> float:
    """diffusers' guidance_scale as sdlab's cfg_scale: diffusers turns classifier-free guidance off at
    guidance_scale <= 1 (SD-Turbo's examples pass 0.0: the conditional prediction alone), where sdlab's
    cfg_scale, as A1111's, would extrapolate towards the unconditional one (0: the unconditional alone)."""
    return guidance_scale if guidance_scale > 1 else 1.0


def _broadcast(value: str | list[str], n: int, name: str) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} texts for {name} for {n} prompts: give one string or one per prompt")
    return values


def _first(texts: list[str] | None) -> str | None:
    return None if texts is None else texts[0]


def _step_end_adapter(pipe, callback_on_step_end):
    if callback_on_step_end is None:
        return None
    return lambda info: callback_on_step_end(pipe, info.step - 1, info.sigma, {"latents": info.denoised})


def _folder_sampler(path: Path, model: Model) -> str:
    """The sampler matching the folder's scheduler/scheduler_config.json; for a single file (or a folder
    without one), the scheduler the family's folders ship (SD: PNDM, i.e. PLMS; SDXL: Euler)."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_class_name", "")
    else:
        name = families.family_of(model.config).diffusers_scheduler or "PNDMScheduler"
    return SCHEDULER_SAMPLERS.get(name, "PLMS")


# --- finding a model by id --------------------------------------------------------------------------


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local path as is; else a Hugging Face id ("org/name") looked up in the local hub cache, then
    downloaded through `huggingface_hub` if it is installed and a network exists."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    model_id = str(path_or_id)
    cached = _hub_cache_snapshot(model_id)
    if cached is not None:
        return cached
    downloaded = _try_download(model_id)
    if downloaded is not None:
        return downloaded
    raise CheckpointError(
        f"{model_id!r} is neither a local file or folder nor in the Hugging Face cache "
        f"({_hub_cache_dir()}). Get the weights with `huggingface-cli download {model_id}` on a machine with a "
        "network (and copy the cache or folder here), or pass the path of a diffusers folder or a "
        ".safetensors/.ckpt file.")


def _hub_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _hub_cache_snapshot(model_id: str) -> Path | None:
    """The snapshot folder `refs/main` points to in the hub cache layout, if present."""
    repo = _hub_cache_dir() / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


def _try_download(model_id: str) -> Path | None:
    if "/" not in model_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception:  # no network, unknown id, gated repo: fall through to the explanatory error
        return None
