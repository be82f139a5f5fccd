"""The server's settings: one frozen dataclass, filled by `sdlab serve`'s flags or by Python code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ParameterError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs.

    Security defaults: it listens on loopback only; with `api_key` every route needs
    `Authorization: Bearer <key>` (or HTTP basic auth whose password is the key, which lets a browser log
    in); with `basic_auth` ("user:password") every route needs those credentials. No CORS headers are sent
    unless `cors_origins` lists origins. On loopback, only requests for localhost / 127.0.0.1 / [::1] (and
    `allowed_hosts`) are answered, so that a web page cannot reach it through DNS rebinding; cross-site and
    non-JSON POSTs are refused (CSRF). Clients pick models by *name* only, among `builtin`, the startup
    `model`, and the checkpoints found directly in `models_dir`, and LoRAs by name among the files directly
    in `lora_dirs`; no request carries a filesystem path. Every request is priced before any model work and
    refused over `max_job_seconds`; every job can be stopped within about a second (see docs/security.md).
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
    shutdown_grace_s: float = 10.0  # on SIGTERM the running job gets this long to finish, then is aborted
    device: str = "cpu"
    dtype: str = "fp32"
    low_memory: bool = False  # models hold only the running stage's networks in memory (sdlab.residency); no LoRAs
    plain: bool = False  # models on the plain inference path (no packed weights: sdlab.load's plain=True)
    quantize: str | None = None  # "int8": models compute the UNet in int8 (sdlab.load's quantize)
    log_level: str = "info"
    # Named files clients may use (`<lora:name:w>`): looked up only directly inside these folders.
    lora_dirs: tuple[Path, ...] = ()
    # The cost of one job (server/limits.py). A request is priced before any model work (its FLOP, with the
    # VAE and the sampler's evaluations counted) and refused (422) if it would take longer than
    # max_job_seconds at this machine's measured speed (flops_per_second: None = measured when a model is
    # loaded); a job still running after job_timeout_s is stopped (None: 2 x max_job_seconds; 0: never).
    max_job_seconds: float = 300.0
    job_timeout_s: float | None = None
    flops_per_second: float | None = None
    max_image_pixels: int = 2048 * 2048  # width x height of one image: bounds the VAE's memory
    # After POST /interrupt the job may finish decoding what it has for this long before it is aborted.
    interrupt_grace_s: float = 5.0
    # Web-facing checks (auth.py, app.py). allowed_hosts: Host header names answered besides localhost,
    # 127.0.0.1 and [::1] (with any port); "*" = any. On a non-loopback address, empty = any.
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int | None = None  # a request body; None: room for 3 base64 images of max_upload_bytes
    max_infotext_chars: int = 32 * 1024  # /png-info parses at most this much `parameters` text

    def __post_init__(self) -> None:
        _check_credentials(self)

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def body_limit(self) -> int:
        base64_image = self.max_upload_bytes * 4 // 3 + 4
        return self.max_body_bytes if self.max_body_bytes is not None else 3 * base64_image + 2**20

    @property
    def host_names(self) -> frozenset[str] | None:
        """The Host names (lower case, without port or brackets) requests may carry; None = any."""
        if "*" in self.allowed_hosts or not (self.is_loopback or self.allowed_hosts):
            return None  # on the network, clients may use names the server cannot know; --allowed-host narrows it
        return frozenset((*LOOPBACK_HOSTS, *map(_bare_host, self.allowed_hosts)))


def _bare_host(name: str) -> str:
    """An --allowed-host as the Host check compares it: 'SD.example:8443' -> 'sd.example', '[fe80::1]' ->
    'fe80::1' (an IPv6 address without brackets stays as it is)."""
    name = name.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    if name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def _check_credentials(settings: ServerSettings) -> None:
    """An empty key or password would look like protection and be none (or refuse everyone)."""
    if settings.api_key is not None and not settings.api_key.strip():
        raise ParameterError("api_key is empty: give a non-empty key (--api-key / SDLAB_API_KEY), or none to "
                             "serve without authentication")
    if settings.basic_auth is not None:
        user, sep, password = settings.basic_auth.partition(":")
        if not (sep and user and password):
            raise ParameterError("basic_auth must be 'user:password' with a non-empty user and password "
                                 "(--basic-auth / SDLAB_BASIC_AUTH)")
