"""OpenAI-compatible image generation: `POST /v1/images/generations` (prompt, n, size, response_format).

Only `response_format="b64_json"` is offered: a "url" answer would need the server to store and serve
images, which it does not do. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from ..errors import ParameterError
from ..params import GenerationParams
from ..pngmeta import parse_size
from .codec import b64
from .schemas import DEFAULTS, OpenAIImageRequest

router = APIRouter(prefix="/v1", tags=["OpenAI API"])
MAX_N = 10  # OpenAI's own limit


class OpenAIParamError(ParameterError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@router.post("/images/generations")
async def generations(body: OpenAIImageRequest, request: Request) -> dict:
    state = request.app.state.sdlab
    if body.response_format != "b64_json":
        raise OpenAIParamError(
            f"response_format {body.response_format!r} is not supported by this server; use 'b64_json'",
            "response_format")
    if not 1 <= body.n <= MAX_N:
        raise OpenAIParamError(f"n must be from 1 to {MAX_N}, got {body.n}", "n")
    width, height = parse_size(body.size) if body.size else (None, None)
    params = GenerationParams(prompt=body.prompt, negative_prompt=body.negative_prompt, width=width,
                              height=height, steps=body.steps, cfg_scale=body.cfg_scale, seed=body.seed,
                              batch_size=body.n, sampler=DEFAULTS.sampler, schedule=DEFAULTS.schedule)
    prepared = await asyncio.to_thread(state.prepare, params, model=body.model)
    output = await state.run(prepared, client=request)
    data = [{"b64_json": b64(png), "revised_prompt": body.prompt} for png in output.pngs]
    return {"created": int(time.time()), "data": data}
