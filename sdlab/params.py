"""`GenerationParams`: the one description of a generation request.

The Python API takes it, the CLI's flags and the HTTP server's request schemas are derived from it, and the
PNG metadata is written from it. `validate` checks everything that can be checked before any model work.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from PIL import Image

from .config import ModelConfig
from .diffusion.registry import get_sampler
from .diffusion.schedules import SCHEDULES
from .errors import ParameterError
from .families import family_of

MAX_SIDE = 4096
MAX_BATCH = 64
MAX_STEPS = 1000
MAX_CONDITION_PIXELS = 16384  # SDXL size/crop conditions: a side in pixels
MAX_TOKEN_MERGING = 0.75  # every source token of each 2x2 cell merged (sdlab.tome)
DEFAULT_REFINER_SWITCH = 0.8  # A1111's "Switch at" default: a refiner runs the last 20% of the schedule


@dataclass(frozen=True)
class GenerationParams:
    """What to generate. Defaults give good images fast: DPM++ 2M with the Karras schedule reaches in 20-30
    steps the quality that the classic description reaches with 50-100 DDPM-style steps.

    Mode: txt2img without `init_image`; img2img with it (`strength` = how much of the schedule to run:
    1.0 ignores the image, 0.0 returns it unchanged); inpainting with `init_image` and `mask` (white =
    repaint). `seed` None draws a random one; image i of a batch uses seed + i, so it can be re-created
    alone. `width`/`height` None use the model's native size.
    """

    prompt: str = ""
    negative_prompt: str = ""
    # The second text encoder's prompts (SDXL's OpenCLIP bigG; diffusers' prompt_2 / negative_prompt_2): the
    # first encoder (CLIP ViT-L) encodes prompt, the second prompt_2. None: the same text as the first.
    # Families with one text encoder accept only None or the first prompt's text.
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str | None = None  # None: the model's default, see `default_schedule`
    cfg_scale: float | None = None  # None: the model's default (config.default_guidance; SD's usual is 7)
    guidance_rescale: float = 0.0
    seed: int | None = None
    batch_size: int = 1
    clip_skip: int = 1  # A1111's convention: 1 = the last layer, 2 = the penultimate
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    eta: float | None = None  # DDIM / ancestral noise amount; None = the sampler's default
    # LoRA adapters merged for this request: (file path or name, weight); `<lora:name:w>` prompt tags add more.
    loras: tuple[tuple[str, float], ...] = ()
    # Opt-in speedup that costs some quality: run the whole UNet only every `deepcache`-th evaluation and
    # reuse its deep features in between (DeepCache, see sdlab.deepcache). 1 = off.
    deepcache: int = 1
    # Opt-in speedup that costs some quality: merge this fraction of the tokens before self-attention at the
    # highest-resolution attention level (ToMe for SD, see sdlab.tome). 0 = off, at most 0.75.
    token_merging: float = 0.0
    # SDXL's size and crop conditions (micro-conditioning, Podell et al. 2023 sec. 2.2), (height, width) and
    # (top, left) in pixels as diffusers takes them: None sizes are the image's own size (what diffusers and
    # A1111 pass); the negative ones default to the positive ones. Other families ignore them.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    # The SDXL refiner's aesthetic-score condition (diffusers' and A1111's defaults).
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # With a refiner model (`generate(..., refiner=...)`): the fraction of the schedule after which it takes
    # over (A1111's refiner_switch_at; None: DEFAULT_REFINER_SWITCH, 0.8).
    refiner_switch_at: float | None = None
    # Control units (sdlab.control.ControlUnit: a ControlNet or T2I-Adapter with its control image, weight,
    # step window and mode); several sum their residuals. They steer the base model only, not a refiner.
    control: tuple = ()

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def replace(self, **changes) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def resolved(self, config: ModelConfig) -> GenerationParams:
        """Fill in what defaults to the model or to chance (size, seed), then validate."""
        size = config.default_size
        params = self.replace(
            width=self.width if self.width is not None else _side(self.init_image, 0, size),
            height=self.height if self.height is not None else _side(self.init_image, 1, size),
            seed=self.seed if self.seed is not None else random.randrange(2**32),
            schedule=self.schedule if self.schedule is not None else default_schedule(config, self.sampler),
            cfg_scale=self.cfg_scale if self.cfg_scale is not None else config.default_guidance,
        )
        params.validate(config)
        return params

    @property
    def seeds(self) -> list[int]:
        return [(self.seed or 0) + i for i in range(self.batch_size)]

    def validate(self, config: ModelConfig) -> None:
        """Raise ParameterError naming the first bad field and what would be valid."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 8, MAX_SIDE)
                if value % 8:
                    raise ParameterError(f"{name}={value} is not a multiple of 8; try {value // 8 * 8 or 8}")
        for name in ("prompt_2", "negative_prompt_2"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ParameterError(f"{name} must be a string or None (the first prompt's text), got "
                                     f"{type(getattr(self, name)).__name__}")
            family_of(config).check_second_prompts(config, name, [getattr(self, name.removesuffix("_2"))],
                                                   [getattr(self, name)])
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        _check_int("clip_skip", self.clip_skip, 1, family_of(config).clip_skip_limit(config))
        _check_int("deepcache", self.deepcache, 1, MAX_STEPS)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1 - MAX_BATCH)
        if self.cfg_scale is not None:
            _check_range("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_range("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _check_range("strength", self.strength, 0.0, 1.0)
        _check_range("token_merging", self.token_merging, 0.0, MAX_TOKEN_MERGING)
        if self.eta is not None:
            _check_range("eta", self.eta, 0.0, 10.0)
        if self.refiner_switch_at is not None:
            _check_range("refiner_switch_at", self.refiner_switch_at, 0.0, 1.0)
        get_sampler(self.sampler)  # raises, listing the valid names
        if self.schedule is not None and self.schedule.lower() not in SCHEDULES:
            raise ParameterError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        self._validate_images(config)
        self._validate_size_conditions()
        self._validate_control(config)

    def _validate_control(self, config: ModelConfig) -> None:
        from .control.unit import MAX_UNITS, ControlUnit  # (sdlab.control loads networks: import when used)

        if not isinstance(self.control, (tuple, list)) or len(self.control) > MAX_UNITS:
            raise ParameterError(f"control must be a tuple of at most {MAX_UNITS} sdlab.control.ControlUnit")
        for i, unit in enumerate(self.control):
            if not isinstance(unit, ControlUnit):
                raise ParameterError(f"control[{i}] must be an sdlab.control.ControlUnit, got {type(unit).__name__}")
            unit.validate(config, i)

    def _validate_size_conditions(self) -> None:
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "crops_coords_top_left", "negative_crops_coords_top_left"):
            value = getattr(self, name)
            if value is None:
                continue
            low = 0 if "crops" in name else 1
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                pair = "top, left" if low == 0 else "height, width"
                raise ParameterError(f"{name} must be a pair of integers ({pair}), got {value!r}")
            for v in value:
                _check_int(name, v, low, MAX_CONDITION_PIXELS)
        _check_range("aesthetic_score", self.aesthetic_score, 0.0, 10.0)
        _check_range("negative_aesthetic_score", self.negative_aesthetic_score, 0.0, 10.0)

    def size_conditions(self, negative: bool = False) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(original size, crop top-left, target size) of the positive or the negative prompt's
        conditioning, defaults filled in; `resolved` params (width and height known)."""
        image = (self.height, self.width)
        original, crop, target = self.original_size or image, self.crops_coords_top_left, self.target_size or image
        if negative:
            original = self.negative_original_size or original
            crop = self.negative_crops_coords_top_left or crop
            target = self.negative_target_size or target
        return tuple(original), tuple(crop), tuple(target)

    def _validate_images(self, config: ModelConfig) -> None:
        if self.mask is not None and self.init_image is None:
            raise ParameterError("a mask needs an init_image to inpaint")
        if config.is_inpainting and self.init_image is None:
            raise ParameterError(f"{config.name} is an inpainting model: give an init_image and a mask")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise ParameterError(
                f"the mask is {self.mask.width}x{self.mask.height} but the image is "
                f"{self.init_image.width}x{self.init_image.height}; they must be the same size")


def default_schedule(config: ModelConfig, sampler: str | None = None) -> str:
    """"karras", except
    - for the samplers of distilled models (LCM, TCD): "automatic", the timesteps they were distilled on
      (a Karras ramp would put their few steps at noise levels the model never learned to jump from);
    - for zero-terminal-SNR models: their first sigma is ~4096 (pure noise), and a Karras ramp from there
      spends half of 20 steps above sigma 40, where the image is still noise; their own (trailing) timesteps
      ("automatic") take one step from pure noise and spend the rest where detail forms."""
    if sampler is not None and _distilled_sampler(sampler):
        return "automatic"
    return "automatic" if config.schedule.zero_terminal_snr else "karras"


def _distilled_sampler(name: str) -> bool:
    from .diffusion.registry import get_sampler  # (the registry imports the samplers: only when asked)

    try:
        return get_sampler(name).style == "lcm"
    except ParameterError:  # validate() says what is wrong with the name
        return False


def _side(image: Image.Image | None, axis: int, default: int) -> int:
    """An init image's side rounded down to a multiple of 8 (as diffusers does), else the default."""
    return default if image is None else max(8, image.size[axis] // 8 * 8)


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ParameterError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_range(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ParameterError(f"{name} must be a number from {low} to {high}, got {value!r}")
