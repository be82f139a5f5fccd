"""The FastAPI application: `create_app(settings)`.

Routes: the A1111 API (`/sdapi/v1`), the OpenAI images API (`/v1/images/generations`), sdlab's job routes
(`/sdlab/v1/jobs`), and the web UI (`/`, static files). Errors: bad parameters 422 (OpenAI routes: 400),
a full queue 429 with Retry-After, shutting down 503, a failed generation 500 with its message. Before
any route, `RequestGuard` answers a wrong Host 400, missing credentials 401, cross-site or non-JSON
requests 403 (auth.py says why), a body over `max_body_bytes` 413 and JSON nested too deep 422. Every
error body is JSON with a one-line message that quotes client input only briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..errors import ParameterError, SdlabError
from ..generation import NumericalError
from . import a1111, jobs_api, openai
from .auth import (
    CHALLENGE,
    authorized,
    content_type_refusal,
    cross_site_refusal,
    host_refusal,
    is_allowed_preflight,
    is_json,
)
from .codec import json_depth
from .jobs import ClientGoneError, DuplicateJobError, JobTimeoutError, QueueFullError, ShuttingDownError
from .settings import ServerSettings
from .state import ServerState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_JSON_DEPTH = 32  # A1111 payloads nest a few levels (alwayson_scripts); Python's parser recurses per level
MAX_MESSAGE_CHARS = 1000
MAX_ERRORS = 20  # validation errors listed in one 422


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await asyncio.to_thread(state.stop)

    app = FastAPI(title="sdlab", version=__version__, lifespan=lifespan)
    app.state.sdlab = state
    for router in (a1111.router, openai.router, jobs_api.router):
        app.include_router(router)
    _add_ui(app)
    _add_error_handlers(app)
    _add_security(app, settings)
    return app


def _add_ui(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _add_security(app: FastAPI, settings: ServerSettings) -> None:
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestGuard, settings=settings)  # added last: it runs first, before CORS


class RequestGuard:
    """The checks every HTTP request passes before any route, in this order: Host (400), credentials (401),
    cross-site state changes and non-JSON bodies (403), body size (413), JSON nesting (422)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None:
            try:
                body = await _read_body(receive, self.settings.body_limit)
            except _ClientGone:
                return
            if body is None:
                refusal = _error(request, 413, self._too_large())
            elif body and is_json(request.headers.get("content-type", "")) and await _too_deep(body):
                refusal = _error(request, 422, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
            else:
                return await self.app(scope, _replay(body, receive), send)
        await refusal(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        """A response refusing the request from its headers alone, or None."""
        method, headers = request.method, request.headers
        message = host_refusal(headers.get("host"), self.settings)
        if message:
            return _error(request, 400, message)
        if not is_allowed_preflight(method, headers, self.settings) and not authorized(
                headers.get("authorization"), self.settings):
            return _error(request, 401, "not authenticated: send the API key as 'Authorization: Bearer <key>'",
                          headers=CHALLENGE)
        message = cross_site_refusal(method, headers, self.settings) or content_type_refusal(method, headers)
        if message:
            return _error(request, 403, message)
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return _error(request, 400, "Content-Length is not a number")
        if int(length) > self.settings.body_limit:
            return _error(request, 413, self._too_large())
        return None

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.settings.body_limit} bytes"


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it grows past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the routes the body already read, then waits for the disconnect as usual."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return replay


async def _too_deep(body: bytes) -> bool:
    if len(body) < 2**20:
        return json_depth(body) > MAX_JSON_DEPTH
    return await asyncio.to_thread(json_depth, body) > MAX_JSON_DEPTH  # ~4 ms per MB: not on the event loop


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status: int, message: str, *, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    message = one_line(message)
    if _is_openai(request):
        kind = {429: "rate_limit_error", 503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        status = 400 if status == 422 else status
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def one_line(message: str) -> str:
    """A message on one line, each long run of non-space characters (echoed client input) shortened."""
    message = " ".join(message.splitlines())
    message = re.sub(r"\S{101,}", lambda run: f"{run[0][:60]}...({len(run[0])} characters)", message)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def validation_errors(error: RequestValidationError) -> list[dict]:
    """pydantic's errors without the `input` they quote (it may be huge, or NaN, which JSON cannot carry)."""
    return [{"type": e.get("type"), "loc": [one_line(str(p)) if isinstance(p, str) else p for p in e.get("loc", ())],
             "msg": one_line(str(e.get("msg", "")))} for e in error.errors()[:MAX_ERRORS]]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        errors = validation_errors(error)
        if not _is_openai(request):
            return JSONResponse({"detail": errors}, status_code=422)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"][1:])
        return _error(request, 422, f"{field}: {first['msg']}", param=field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # 404s and 405s, and the routes' own HTTPExceptions: their details may quote a client's path
        return _error(request, error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(SdlabError)
    async def sdlab_error(request: Request, error: SdlabError):
        if isinstance(error, QueueFullError):
            return _error(request, 429, str(error), headers={"Retry-After": str(error.retry_after)})
        if isinstance(error, ShuttingDownError):
            return _error(request, 503, str(error), headers={"Retry-After": "30"})
        if isinstance(error, DuplicateJobError):
            return _error(request, 409, str(error))
        if isinstance(error, ParameterError):
            return _error(request, 422, str(error), param=getattr(error, "param", None))
        if isinstance(error, JobTimeoutError):
            return _error(request, 503, str(error))
        if isinstance(error, ClientGoneError):
            return _error(request, 499, str(error))  # nobody reads it; nginx's "client closed request"
        log.error("request failed: %s", error)
        return _error(request, 500, _client_message(error))


def _client_message(error: SdlabError) -> str:
    """What a client hears of a failed job: the message when it can only speak of the request (NaN in the
    latents), otherwise the kind of failure; the details, which may name server paths, go to the log."""
    if isinstance(error, NumericalError):
        return str(error)
    return f"the job failed ({type(error).__name__}); the server log has the details"
