"""What one request may cost: admission by estimated time, before any model work.

A request's work is priced in FLOP (`sdlab.cost`: UNet evaluations of its sampler and guidance, the VAE
decodes and encodes, the text encoder), then turned into seconds at this machine's speed for that model,
measured when the model is loaded (UNet passes at its native size and at half the side: FLOP/s and a fixed
cost per pass) and corrected by every finished job. A request over `max_job_seconds` is refused with 422, saying what it would cost and what the limit
is; one image may not exceed `max_image_pixels` (what bounds the VAE's memory). Jobs that still run past
`job_timeout_s` are stopped by the job queue.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..config import ModelConfig
from ..cost import cost_model, describe_flops, unet_evaluations
from ..diffusion.conditioning import Conditioning, run_network
from ..errors import ParameterError
from ..params import GenerationParams
from .settings import ServerSettings

log = logging.getLogger(__name__)


class CostLimitError(ParameterError):
    """A request that would take longer than this server allows one job."""


class JobLimits:
    """Prices requests in seconds: FLOP / the machine's FLOP/s, plus a fixed cost per UNet evaluation (the
    per-call overhead that dominates small models: the built-in model's 64x64 pass reaches a few percent of
    the FLOP/s that a 512x512 one does)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.flops_per_second = settings.flops_per_second  # of the model measured last; None until measured
        self.seconds_per_evaluation = 0.0
        self.correction = 1.0  # actual / predicted seconds of the finished jobs (moving average)
        self._speeds: dict[ModelConfig, tuple[float, float]] = {}  # (FLOP/s, seconds per evaluation)
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

    def seconds(self, flops: float, evaluations: int, config: ModelConfig | None = None) -> float:
        """Estimated seconds on `config`'s measured speed (or the last model's, for one not loaded yet)."""
        rate, overhead = self._speeds.get(config, (self.flops_per_second, self.seconds_per_evaluation))
        if not rate:
            return 0.0
        return self.correction * (flops / rate + evaluations * overhead)

    def check(self, config: ModelConfig, params: GenerationParams, *, n_iter: int = 1,
              save_steps: bool = False) -> float:
        """Refuse (CostLimitError) a request over the limits; return its FLOP."""
        pixels, most = params.width * params.height, self.settings.max_image_pixels
        if pixels > most:
            raise CostLimitError(f"{params.width}x{params.height} is {pixels} pixels per image; this server makes "
                                 f"images of at most {most} pixels (max_image_pixels)")
        flops = self.estimate(config, params, n_iter=n_iter, save_steps=save_steps)
        seconds = self.seconds(flops, unet_evaluations(params, n_iter), config)
        limit = self.settings.max_job_seconds
        if seconds > limit:
            raise CostLimitError(
                f"this request is about {describe_flops(flops)} of work, about {seconds:.0f} s on this server; "
                f"the limit is {limit:g} s per job (max_job_seconds): ask for fewer steps or images, or a "
                f"smaller size")
        return flops

    # ---- the machine's speed (worker thread) ----

    def calibrate(self, model) -> None:
        """Time one UNet pass (batch 2, as with guidance) at the model's native size and at half its side:
        the difference gives FLOP/s, the rest the fixed cost of a pass. Skipped when the settings fix the
        speed or it was measured before."""
        config = model.config
        if self.settings.flops_per_second is not None or config in self._speeds:
            return
        step = 2 ** (len(config.unet.channels) - 1)
        high = max(step, config.default_size // config.vae.downscale // step * step)
        low = max(step, high // 2 // step * step)
        unet = cost_model(config).unet
        (f1, t1), (f2, t2) = ((2 * unet.flops(s * s), _time_unet_pass(model, s)) for s in (low, high))
        # t = overhead + f / rate through both points; the rate is at least the larger pass's average (no
        # negative overhead), which is also what a timing disturbed by other work on the machine falls back to.
        average = f2 / max(t2, 1e-6)
        self.flops_per_second = max(average, (f2 - f1) / (t2 - t1)) if f2 > f1 and t2 > t1 else average
        self.seconds_per_evaluation = max(0.0, t1 - f1 / self.flops_per_second) / 2
        self._speeds[config] = (self.flops_per_second, self.seconds_per_evaluation)
        log.info("this machine runs %s/s on %s, plus %.1f ms per UNet evaluation", describe_flops(
            self.flops_per_second), config.name, 1000 * self.seconds_per_evaluation)

    def observe(self, config: ModelConfig, flops: float, evaluations: int, seconds: float) -> None:
        """Move the correction halfway towards what a finished job took against its estimate (jobs are the
        real workload, and the machine may be shared), within 4x either way."""
        predicted = self.seconds(flops, evaluations, config) / self.correction
        if self.settings.flops_per_second is None and predicted > 0.05:
            ratio = min(4.0, max(0.25, seconds / predicted))
            self.correction = 0.5 * self.correction + 0.5 * ratio


def _time_unet_pass(model, side: int, repeats: int = 3) -> float:
    """Seconds of one UNet pass on (2, C, side, side) latents: the fastest of `repeats` after a first call
    (which packs weights and allocates), as the least disturbed by other work on the machine."""
    config = model.config
    x = torch.zeros(2, config.unet.in_channels, side, side, device=model.device, dtype=model.dtype)
    context = torch.zeros(2, 77, config.unet.context_dim, device=model.device, dtype=model.dtype)
    cond = Conditioning(context=context, added=torch.zeros(2, config.unet.added_dim, device=model.device,
                                                           dtype=model.dtype) if config.unet.added_dim else None)
    t = torch.full((2,), 500.0, device=model.device)
    best = float("inf")
    with torch.no_grad():
        run_network(model.unet, x, t, cond)
        for _ in range(repeats):
            _synchronize(model.device)
            start = time.perf_counter()
            run_network(model.unet, x, t, cond)
            _synchronize(model.device)  # a GPU runs the pass after the call returns
            best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
