"""What the worker thread does for a generation job: `generate` over the job's batches, reporting progress,
previews and (optionally) the x0 trajectory on the job as it goes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image

from ..cost import unet_evaluations
from ..generation import StepInfo, decode_latents, generate
from ..images import grid
from ..interrupts import GenerationAborted
from ..params import GenerationParams
from ..pngmeta import ModelInfo, infotext, png_bytes
from ..trajectory import TrajectoryRecorder, chain
from .jobs import ClientGoneError, Job, JobTimeoutError, ShuttingDownError
from .limits import JobLimits
from .registry import ModelRegistry

PREVIEW_SHARE = 0.2  # live previews may take at most this share of a job's time


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: `params` is resolved (seed and size set); `n_iter` batches of
    `params.batch_size` images run one after the other, batch i with seed `params.seed + i * batch_size`."""

    params: GenerationParams
    model: str
    n_iter: int = 1
    save_steps: bool = False
    flops: float = 0.0  # the estimated work (server/limits.py)
    refiner: str | None = None  # a model name: the model that finishes each run (A1111's refiner_checkpoint)

    @property
    def seeds(self) -> list[int]:
        return [self.params.seed + i for i in range(self.params.batch_size * self.n_iter)]


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    model: ModelInfo
    interrupted: bool = False
    pngs: list[bytes] = field(default_factory=list)  # the images with their infotext, encoded on the worker


def run_generation(registry: ModelRegistry, request: GenerationRequest, job: Job,
                   named_loras: Mapping | None = None, limits: JobLimits | None = None) -> GenerationOutput:
    model, info = registry.load(request.model)
    refiner = registry.load_refiner(request.refiner) if request.refiner is not None else None
    start = time.perf_counter()
    out = GenerationOutput([], [], [], info)
    try:
        _run_batches(model, info, request, job, named_loras, out, refiner)
    except GenerationAborted:  # stopped inside a network: the images of the batches before
        out.interrupted = True
    if out.interrupted and job.stop_reason != "interrupted":  # only /interrupt answers with what there is
        raise _stopped_error(job)
    if limits is not None and not out.interrupted:
        limits.observe(model.config, request.flops, unet_evaluations(request.params, request.n_iter),
                       time.perf_counter() - start)
    return out


def _run_batches(model, info: ModelInfo, request: GenerationRequest, job: Job, named_loras, out,
                 refiner=None) -> None:
    batch = request.params.batch_size
    for i in range(request.n_iter):
        params = request.params.replace(seed=request.params.seed + i * batch)
        recorder = TrajectoryRecorder(model) if request.save_steps and i == 0 else None
        watcher = _ProgressWatcher(model, job, i, request.n_iter)
        result = generate(model, params, callback=chain(watcher, recorder), interrupt=job.interrupt.is_set,
                          abort=job.should_abort, named_loras=named_loras,
                          refiner=None if refiner is None else refiner[0])
        if recorder is not None:
            job.frames = [png_bytes(grid(frame, columns=len(frame))) for frame in recorder.frames]
            job.frame_steps = list(recorder.steps)
        refiner_info = None if refiner is None else refiner[1]
        texts = [infotext(result.params, info, index=k, refiner=refiner_info) for k in range(batch)]
        out.images += result.images
        out.infotexts += texts
        out.pngs += [png_bytes(image, text) for image, text in zip(result.images, texts)]  # off the event loop
        out.seeds += result.params.seeds
        if result.interrupted:
            out.interrupted = True
            return


def _stopped_error(job: Job) -> Exception:
    if job.stop_reason == "timeout":
        return JobTimeoutError(f"the job ran past this server's time limit of {job.time_limit:g} s and was stopped")
    if job.stop_reason == "disconnected":
        return ClientGoneError("the client disconnected")
    return ShuttingDownError("the server shut down while this job ran")


class _ProgressWatcher:
    """Step callback: overall progress on the job, and a decoded preview when a client asked for one."""

    def __init__(self, model, job: Job, iteration: int, n_iter: int):
        self.model, self.job, self.iteration, self.n_iter = model, job, iteration, n_iter
        self.next_preview = 0.0  # time.perf_counter() before which no preview is decoded

    def __call__(self, info: StepInfo) -> None:
        job = self.job
        job.total = info.total * self.n_iter
        job.step = self.iteration * info.total + info.step
        if job.want_preview and time.perf_counter() >= self.next_preview:
            job.want_preview = False
            start = time.perf_counter()
            images = decode_latents(self.model, info.denoised)
            job.preview, job.preview_step = png_bytes(grid(images, columns=len(images))), job.step
            took = time.perf_counter() - start
            self.next_preview = start + took / PREVIEW_SHARE  # previews stay a bounded share of the job
