"""A diffusers-style front door: the example code users already have runs with only the import changed.

    from sdlab import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", torch_dtype=torch.float32)
    image = pipe("a photo of an astronaut", num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]

Everything is delegated to `sdlab.generation.sample_batch`. Differences from diffusers' semantics are
noted where they exist: `clip_skip` counts skipped layers as diffusers does (sdlab's own API uses
A1111's convention, skipped + 1); prompts longer than 75 tokens are chunked (A1111) instead of truncated.
The sampler is the model folder's scheduler unless `pipe.sampler` is set to any name of
`sdlab.diffusion.registry` (e.g. "DPM++ 2M" with `pipe.schedule = "karras"`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .generation import sample_batch
from .model import Model
from .params import GenerationParams

# diffusers scheduler class -> sdlab sampler label (what `from_pretrained` picks by default).
SCHEDULER_SAMPLERS = {
    "PNDMScheduler": "PLMS", "DDIMScheduler": "DDIM", "DDPMScheduler": "DDPM", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE", "UniPCMultistepScheduler": "UniPC", "LCMScheduler": "LCM",
}  # fmt: skip


@dataclass
class PipelineOutput:
    images: list  # PIL images


class StableDiffusionPipeline:
    """txt2img; `image=` makes it img2img and `mask_image=` inpainting, as diffusers' three pipelines."""

    default_strength = 0.8

    def __init__(self, model: Model, sampler: str = "PLMS", schedule: str = "automatic"):
        self.model, self.sampler, self.schedule = model, sampler, schedule

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, **_ignored) -> StableDiffusionPipeline:
        """A local diffusers folder, a single checkpoint file, or a Hugging Face model id found in the local
        cache (or downloaded with `huggingface_hub` where a network exists)."""
        path = resolve_model_path(path_or_id)
        model = Model.load(path, variant=variant, dtype=torch_dtype or torch.float32)
        return cls(model, sampler=_folder_sampler(path))

    from_single_file = from_pretrained

    def to(self, device=None, dtype=None) -> StableDiffusionPipeline:
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 image=None, mask_image=None, strength: float | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, generator=None, eta: float = 0.0,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end=None,
                 **_ignored) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _broadcast(negative_prompt or "", len(prompts))
        params = GenerationParams(
            prompt=prompts[0], negative_prompt=negatives[0], width=width, height=height,
            steps=num_inference_steps, sampler=self.sampler, schedule=self.schedule, cfg_scale=guidance_scale,
            guidance_rescale=guidance_rescale, clip_skip=(clip_skip or 0) + 1, init_image=image,
            strength=strength if strength is not None else self._strength(mask_image), mask=mask_image,
            eta=eta if self.sampler.upper() == "DDIM" else None, seed=0,
            batch_size=len(prompts) * num_images_per_prompt,
        ).resolved(self.model.config)
        # diffusers' batch order: each prompt repeated num_images_per_prompt times.
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        if generator is None:
            generator = torch.Generator().manual_seed(torch.seed() % 2**32)
        callback = _step_end_adapter(self, callback_on_step_end)
        result = sample_batch(self.model, prompts, negatives, params, generator, callback=callback)
        return PipelineOutput(result.images)

    def _strength(self, mask_image) -> float:
        return 1.0 if mask_image is not None else self.default_strength


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    default_strength = 0.8


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    default_strength = 1.0


def _broadcast(value: str | list[str], n: int) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} negative prompts for {n} prompts")
    return values


def _step_end_adapter(pipe, callback_on_step_end):
    if callback_on_step_end is None:
        return None
    return lambda info: callback_on_step_end(pipe, info.step - 1, info.sigma, {"latents": info.denoised})


def _folder_sampler(path: Path) -> str:
    """The sampler matching the folder's scheduler/scheduler_config.json (PLMS when there is none)."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return "PLMS"
    name = json.loads(config.read_text()).get("_class_name", "")
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
