"""What one request may cost: admission by estimated time, before any model work.

A request's work is priced in FLOP (`sdlab.cost`: UNet evaluations of its sampler and guidance, the VAE
decodes and encodes, the text encoder), then turned into seconds at this machine's speed, measured once
when the first model is loaded (one UNet pass at the model's native size) and refined by every finished
job. A request over `max_job_seconds` is refused with 422, saying what it would cost and what the limit
is; one image may not exceed `max_image_pixels` (what bounds the VAE's memory). Jobs that still run past
`job_timeout_s` are stopped by the job queue.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..config import ModelConfig
from ..cost import cost_model, describe_flops
from ..errors import ParameterError
from ..params import GenerationParams
from .settings import ServerSettings

log = logging.getLogger(__name__)


class CostLimitError(ParameterError):
    """A request that would take longer than this server allows one job."""


class JobLimits:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.flops_per_second = settings.flops_per_second  # None until measured
        self._lock = threading.Lock()

    @property
    def time_limit(self) -> float | None:
        """Seconds a running job may take before it is stopped; None = no limit."""
        limit = self.settings.job_timeout_s
        if limit is None:
            return 2 * self.settings.max_job_seconds
        return limit or None

    def estimate(self, config: ModelConfig, params: GenerationParams, *, n_iter: int = 1,
                 save_steps: bool = False) -> float:
        """The FLOP of a request (`params` resolved). Every step's preview is decoded with `save_steps`."""
        with self._lock:  # the first pricing of a config counts its networks (~1 s for SD 1.5): once
            costs = cost_model(config)
        return costs.request_flops(config, params, n_iter=n_iter, decodes_per_image=1 + save_steps * params.steps)

    def check(self, config: ModelConfig, params: GenerationParams, *, n_iter: int = 1,
              save_steps: bool = False) -> float:
        """Refuse (CostLimitError) a request over the limits; return its FLOP."""
        pixels, most = params.width * params.height, self.settings.max_image_pixels
        if pixels > most:
            raise CostLimitError(f"{params.width}x{params.height} is {pixels} pixels per image; this server makes "
                                 f"images of at most {most} pixels (max_image_pixels)")
        flops = self.estimate(config, params, n_iter=n_iter, save_steps=save_steps)
        seconds = flops / self.flops_per_second if self.flops_per_second else 0.0
        limit = self.settings.max_job_seconds
        if seconds > limit:
            raise CostLimitError(
                f"this request is about {describe_flops(flops)} of work, about {seconds:.0f} s on this server; "
                f"the limit is {limit:g} s per job (max_job_seconds): ask for fewer steps or images, or a "
                f"smaller size")
        return flops

    # ---- the machine's speed (worker thread) ----

    def calibrate(self, model) -> None:
        """Measure FLOP/s with one UNet pass (batch 2, as with guidance) at the model's native size, unless
        the settings fix the speed or it was measured before."""
        if self.flops_per_second is not None:
            return
        config = model.config
        side = config.default_size // config.vae.downscale
        x = torch.zeros(2, config.unet.in_channels, side, side, device=model.device, dtype=model.dtype)
        context = torch.zeros(2, 77, config.unet.context_dim, device=model.device, dtype=model.dtype)
        t = torch.full((2,), 500.0, device=model.device)
        with torch.no_grad():
            model.unet(x, t, context)  # the first call packs weights, allocates: not representative
            start = time.perf_counter()
            model.unet(x, t, context)
            seconds = time.perf_counter() - start
        self.flops_per_second = 2 * cost_model(config).unet.flops(side * side) / max(seconds, 1e-6)
        log.info("this machine runs %s/s on %s (one UNet pass, %dx%d, batch 2)",
                 describe_flops(self.flops_per_second), config.name, config.default_size, config.default_size)

    def observe(self, flops: float, seconds: float) -> None:
        """Move the speed halfway towards what a finished job achieved (jobs are the real workload)."""
        if self.settings.flops_per_second is None and self.flops_per_second and seconds > 0.05:
            self.flops_per_second = 0.5 * self.flops_per_second + 0.5 * flops / seconds
