"""AUTOMATIC1111-compatible routes (`/sdapi/v1/...`), so that its clients and scripts work against sdlab.

Behaviour follows A1111's API: a generation request blocks until its images are ready; `/progress` reports
the running job with a preview of its current x0 estimate; `/interrupt` stops it after the current step
and its request returns the images as they are. Differences: the server never writes images to disk
(`save_images` is ignored), and `/options` accepts only `sd_model_checkpoint`.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from PIL import Image, ImageOps

from .. import __version__
from ..diffusion.registry import get_sampler, sampler_names
from ..diffusion.schedules import SCHEDULES
from ..errors import ParameterError
from ..params import GenerationParams, default_schedule
from ..pngmeta import (
    PARAMETERS_KEY,
    SCHEDULE_LABELS,
    parse_infotext,
    split_sampler,
)
from .codec import b64, decode_image
from .engine import GenerationOutput, GenerationRequest
from .schemas import (
    DEFAULTS,
    ImageResponse,
    Img2ImgRequest,
    OptionsUpdate,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from .state import ServerState

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 API"])
SETTABLE_OPTIONS = ("sd_model_checkpoint",)
NO_REFINER = (None, "", "None", "none")  # what A1111 clients send for "no refiner"


def _state(request: Request) -> ServerState:
    return request.app.state.sdlab


# ---- generation ----


@router.post("/txt2img", response_model=ImageResponse)
async def txt2img(body: Txt2ImgRequest, request: Request) -> ImageResponse:
    state = _state(request)
    prepared = await asyncio.to_thread(_prepare, state, body, to_params(body))
    output = await state.run(prepared, body.force_task_id, client=request)
    return _response(body, prepared, output)


@router.post("/img2img", response_model=ImageResponse)
async def img2img(body: Img2ImgRequest, request: Request) -> ImageResponse:
    state = _state(request)
    if not body.init_images:
        raise ParameterError("init_images: give at least one base64 image")
    # Decoding the images takes CPU time that a client chooses: a worker thread's, not the event loop's.
    prepared = await asyncio.to_thread(_prepare_img2img, state, body)
    output = await state.run(prepared, body.force_task_id, client=request)
    return _response(body, prepared, output)


def _prepare_img2img(state: ServerState, body: Img2ImgRequest) -> GenerationRequest:
    limit = state.settings.max_upload_bytes
    init = decode_image(body.init_images[0], "init_images[0]", limit)
    mask = decode_image(body.mask, "mask", limit) if body.mask else None
    if mask is not None and body.inpainting_mask_invert:
        mask = _inverted(mask)
    if mask is not None and mask.size != init.size:
        mask = mask.resize(init.size)  # A1111 resizes the mask to the image
    params = to_params(body).replace(init_image=init, mask=mask, strength=body.denoising_strength)
    return _prepare(state, body, params)


def to_params(body: Txt2ImgRequest) -> GenerationParams:
    """A1111 request fields -> GenerationParams (unvalidated)."""
    sampler, schedule = split_sampler(body.sampler_name or body.sampler_index or DEFAULTS.sampler,
                                      body.scheduler, default_schedule=DEFAULTS.schedule)
    return GenerationParams(
        prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width, height=body.height,
        steps=body.steps, sampler=sampler, schedule=schedule, cfg_scale=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed, batch_size=body.batch_size, eta=body.eta,
        clip_skip=body.override_settings.get("CLIP_stop_at_last_layers", DEFAULTS.clip_skip),
        # A1111's setting for token merging; DeepCache has none there, so sdlab's field name is used
        token_merging=body.override_settings.get("token_merging_ratio", DEFAULTS.token_merging),
        deepcache=body.override_settings.get("deepcache", DEFAULTS.deepcache),
        refiner_switch_at=body.refiner_switch_at,
    )


def _prepare(state: ServerState, body: Txt2ImgRequest, params: GenerationParams) -> GenerationRequest:
    model = body.override_settings.get("sd_model_checkpoint")
    refiner = body.refiner_checkpoint if body.refiner_checkpoint not in NO_REFINER else None
    return state.prepare(params, n_iter=body.n_iter, model=model, save_steps=body.save_steps, refiner=refiner)


def _inverted(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(mask.convert("L"))


def _response(body: Txt2ImgRequest, prepared: GenerationRequest, output: GenerationOutput) -> ImageResponse:
    images = [b64(png) for png in output.pngs]
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return ImageResponse(images=images if body.send_images else [], parameters=parameters,
                         info=json.dumps(_info(prepared, output)))


def _info(prepared: GenerationRequest, output: GenerationOutput) -> dict:
    """The `info` JSON, with the keys A1111's `Processed.js()` has that apply here."""
    p = prepared.params
    n = len(output.images)
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n,
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
        "seed": p.seed, "all_seeds": output.seeds, "subseed": -1, "all_subseeds": [-1] * n,
        "width": p.width, "height": p.height, "sampler_name": p.sampler,
        "scheduler": SCHEDULE_LABELS.get(p.schedule, p.schedule), "cfg_scale": p.cfg_scale, "steps": p.steps,
        "batch_size": p.batch_size, "n_iter": prepared.n_iter, "clip_skip": p.clip_skip,
        "denoising_strength": p.strength if p.mode != "txt2img" else None,
        "sd_model_name": output.model.name, "sd_model_hash": output.model.hash,
        "index_of_first_image": 0, "infotexts": output.infotexts, "interrupted": output.interrupted,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": f"sdlab {__version__}",
    }  # fmt: skip


# ---- progress and control ----


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> ProgressResponse:
    queue = _state(request).queue
    job = queue.current
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": queue.waiting_count(),
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=state)
    if not skip_current_image:
        job.want_preview = True
    state.update(job=job.id, job_count=state["job_count"] + 1, interrupted=job.interrupt.is_set(),
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                 sampling_step=job.step, sampling_steps=job.total)
    image = b64(job.preview) if job.preview and not skip_current_image else None
    return ProgressResponse(progress=job.progress, eta_relative=job.eta_seconds(), state=state,
                            current_image=image, textinfo=f"step {job.step}/{job.total}")


@router.post("/interrupt")
async def interrupt(request: Request) -> dict:
    job = _state(request).queue.current
    if job is not None and job.kind == "generate":
        job.stop("interrupted")
    return {}


@router.post("/skip")
async def skip(request: Request) -> dict:
    return await interrupt(request)


# ---- lists and options ----


@router.get("/samplers")
async def samplers() -> list[dict]:
    return [{"name": s.label, "aliases": [s.key, *s.aliases], "options": {"reference": s.reference}}
            for s in map(get_sampler, sampler_names())]


@router.get("/schedulers")
async def schedulers() -> list[dict]:
    return [{"name": name, "label": SCHEDULE_LABELS.get(name, name), "aliases": None,
             "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False}
            for name in SCHEDULES]


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict]:
    registry = _state(request).registry
    items = []
    for entry in registry.entries():
        sha = registry.sha256(entry.name)
        items.append({"title": registry.title(entry), "model_name": entry.name, "hash": sha[:10] if sha else None,
                      "sha256": sha, "filename": entry.file_name, "config": None})
    return items


@router.get("/loras")
async def loras(request: Request) -> list[dict]:
    """The LoRAs that `<lora:name:w>` tags may name (A1111's shape; `path` is the file name only)."""
    folder = _state(request).loras
    return [{"name": name, "alias": name, "path": folder.path(name).name, "metadata": {}} for name in sorted(folder)]


@router.get("/options")
async def get_options(request: Request) -> dict:
    state = _state(request)
    entry = state.registry.resolve(state.model_name)
    config = state.registry.config(entry.name)
    return {
        "sd_model_checkpoint": state.registry.title(entry), "sd_checkpoint_hash": state.registry.sha256(entry.name),
        "CLIP_stop_at_last_layers": DEFAULTS.clip_skip, "samples_format": "png", "sdlab_version": __version__,
        "sdlab_native_size": config.default_size, "sdlab_default_schedule": default_schedule(config),
        "sdlab_default_cfg": config.default_guidance,
    }  # fmt: skip


@router.post("/options")
async def set_options(body: OptionsUpdate, request: Request) -> dict:
    changes = body.model_extra or {}
    refused = sorted(set(changes) - set(SETTABLE_OPTIONS))
    if refused:
        raise ParameterError(f"options {refused} cannot be set through the API; settable: {list(SETTABLE_OPTIONS)}")
    if "sd_model_checkpoint" in changes:
        await _state(request).switch_model(str(changes["sd_model_checkpoint"]))
    return {}


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest, request: Request) -> PNGInfoResponse:
    settings = _state(request).settings
    # Decoding and parsing take CPU time that a client chooses: a worker thread's, not the event loop's.
    return await asyncio.to_thread(_read_png_info, body.image, settings.max_upload_bytes,
                                   settings.max_infotext_chars)


def _read_png_info(image_b64: str, max_bytes: int, max_chars: int) -> PNGInfoResponse:
    image = decode_image(image_b64, "image", max_bytes)
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop(PARAMETERS_KEY, "")
    if not text:
        return PNGInfoResponse(info="", items=items, parameters={})
    if len(text) > max_chars:
        raise ParameterError(f"image: its {PARAMETERS_KEY} text is {len(text)} characters; this server parses "
                             f"at most {max_chars}")
    parsed = parse_infotext(text)
    parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.fields}
    return PNGInfoResponse(info=text, items=items, parameters=parameters)
