"""The FastAPI application: `create_app(settings)`.

Routes: the A1111 API (`/sdapi/v1`), the OpenAI images API (`/v1/images/generations`), sdlab's job routes
(`/sdlab/v1/jobs`), and the web UI (`/`, static files). Errors: bad parameters 422 (OpenAI routes: 400),
a full queue 429 with Retry-After, shutting down 503, a failed generation 500 with its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..errors import ParameterError, SdlabError
from . import a1111, jobs_api, openai
from .auth import CHALLENGE, authorized
from .jobs import DuplicateJobError, QueueFullError, ShuttingDownError
from .settings import ServerSettings
from .state import ServerState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


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

    @app.middleware("http")
    async def check_auth(request: Request, call_next):
        if request.method != "OPTIONS" and not authorized(request.headers.get("authorization"), settings):
            return JSONResponse({"detail": "not authenticated: send the API key as 'Authorization: Bearer <key>'"},
                                status_code=401, headers=CHALLENGE)
        return await call_next(request)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status: int, message: str, *, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    if _is_openai(request):
        kind = {429: "rate_limit_error", 503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        status = 400 if status == 422 else status
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        if not _is_openai(request):
            from fastapi.exception_handlers import request_validation_exception_handler

            return await request_validation_exception_handler(request, error)
        first = error.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", [])[1:])
        return _error(request, 422, f"{field}: {first.get('msg')}", param=field)

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
        log.error("request failed: %s", error)
        return _error(request, 500, str(error))
