"""The server's settings: one frozen dataclass, filled by `sdlab serve`'s flags or by Python code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs.

    Security defaults: it listens on loopback only; with `api_key` every route needs
    `Authorization: Bearer <key>` (or HTTP basic auth whose password is the key, which lets a browser log
    in); with `basic_auth` ("user:password") every route needs those credentials. No CORS headers are sent
    unless `cors_origins` lists origins. Clients pick models by *name* only, among `builtin`, the startup
    `model`, and the checkpoints found directly in `models_dir`; no request carries a filesystem path.
    """

    model: str | None = "builtin"  # the model loaded at startup: "builtin", "random:<preset>", a name in models_dir or a path
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    basic_auth: str | None = None  # "user:password"
    cors_origins: tuple[str, ...] = ()
    queue_size: int = 8  # jobs waiting behind the running one; more are answered 429
    max_prompt_chars: int = 2000
    max_images: int = 16  # batch_size x n_iter of one request
    max_upload_bytes: int = 16 * 2**20  # each base64 image of a request, decoded
    kept_jobs: int = 32  # finished jobs remembered for /sdlab/v1/jobs (progress, trajectories)
    shutdown_grace_s: float = 10.0  # on SIGTERM the running job gets this long to finish, then is interrupted
    device: str = "cpu"
    dtype: str = "fp32"
    log_level: str = "info"

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
