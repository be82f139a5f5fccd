"""Request and response bodies: A1111's `/sdapi/v1` shapes and OpenAI's `/v1/images/generations`.

Field names are A1111's (modules/api/models.py) so existing clients work unchanged; defaults come from
`GenerationParams`, the one description of a generation. Unknown fields are ignored, as A1111 clients
send many (hires fix, scripts, ...) that have no meaning here. Range checks are `GenerationParams.validate`'s,
run before any model work (422 with its message).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..params import GenerationParams

DEFAULTS = GenerationParams()


class _Lenient(BaseModel):
    # allow_inf_nan: Python's JSON parser reads NaN and Infinity, which are no valid value of any float field
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


class Txt2ImgRequest(_Lenient):
    prompt: str = DEFAULTS.prompt
    negative_prompt: str = DEFAULTS.negative_prompt
    seed: int = Field(-1, description="-1 = random; image i of the request uses seed + i")
    steps: int = DEFAULTS.steps
    cfg_scale: float | None = Field(None, description="default: the model's (7 for SD, 2 for the built-in model)")
    width: int | None = Field(None, description="default: the model's native size (img2img: the image's)")
    height: int | None = None
    sampler_name: str | None = Field(None, description=f"default {DEFAULTS.sampler!r}; see /sdapi/v1/samplers")
    sampler_index: str | None = Field(None, description="old name of sampler_name")
    scheduler: str | None = Field(None, description="default: karras (automatic for zero-terminal-SNR models); see /sdapi/v1/schedulers")
    batch_size: int = DEFAULTS.batch_size
    n_iter: int = 1
    eta: float | None = DEFAULTS.eta
    override_settings: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = Field(None, description="the job id to use (for /sdlab/v1/jobs/{id})")
    refiner_checkpoint: str | None = Field(None, description="a model name of /sdapi/v1/sd-models that finishes "
                                            "the run (the SDXL refiner); none, '' or 'None': no refiner")
    refiner_switch_at: float | None = Field(None, description="the fraction of the steps after which the refiner "
                                            "takes over (default 0.8)")
    send_images: bool = True
    save_steps: bool = Field(False, description="sdlab: keep the x0 preview of every step for /sdlab/v1/jobs/{id}/steps")

    @field_validator("force_task_id")
    @classmethod
    def _addressable_id(cls, job_id: str | None) -> str | None:
        if job_id is not None and not job_id.strip("."):
            raise ValueError("a job id of dots only cannot be a path segment of /sdlab/v1/jobs/{id}; "
                             "use 1-100 letters, digits or _-.:()")
        return job_id

    @field_validator("override_settings")
    @classmethod
    def _finite_numbers(cls, settings: dict[str, Any]) -> dict[str, Any]:
        path = _non_finite_number(settings)
        if path is not None:
            raise ValueError(f"override_settings{path} is not a finite number (NaN and Infinity are not JSON)")
        return settings


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    mask: str | None = Field(None, description="base64 image; white = repaint")
    inpainting_mask_invert: int = 0
    denoising_strength: float = DEFAULTS.strength
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs, each carrying its parameters chunk")
    parameters: dict
    info: str = Field(description="a JSON string: seeds, infotexts, model, ...")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(_Lenient):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class OptionsUpdate(_Lenient):
    model_config = ConfigDict(extra="allow")


class OpenAIImageRequest(_Lenient):
    prompt: str
    n: int = 1
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; default: the model\'s native size')
    response_format: str = "b64_json"
    model: str | None = None
    # sdlab extensions (OpenAI has no such fields)
    negative_prompt: str = DEFAULTS.negative_prompt
    seed: int | None = None
    steps: int = DEFAULTS.steps
    cfg_scale: float | None = Field(None, description="default: the model's (7 for SD, 2 for the built-in model)")


def _non_finite_number(value: Any) -> str | None:
    """The path ('.key[0]') to the first NaN or infinity inside nested dicts and lists, or None."""
    pending = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path
        if isinstance(item, dict):
            pending.extend((f"{path}.{str(key)[:40]}", child) for key, child in item.items())
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None
