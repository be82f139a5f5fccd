"""The server's state shared by all routes: settings, models, the job queue, and the checks that turn a
request into a validated `GenerationRequest` before any model work."""

from __future__ import annotations

import asyncio
import logging
import threading

from ..errors import ParameterError
from ..generation import check_refiner
from ..params import GenerationParams
from ..prompts import extract_lora_tags
from ..resources import LORA_SUFFIXES, LoadedResourceFolder
from .engine import GenerationOutput, GenerationRequest, run_generation
from .jobs import JOB_ID, ClientGoneError, Job, JobQueue
from .limits import JobLimits
from .registry import ModelRegistry
from .settings import ServerSettings

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.registry = ModelRegistry(settings)
        self.queue = JobQueue(settings.queue_size, settings.kept_jobs)
        self.model_name = self.registry.default_name
        self.limits = JobLimits(settings)
        self.loras = LoadedResourceFolder("LoRA", settings.lora_dirs, LORA_SUFFIXES)
        self._shutdown_started = threading.Event()

    # ---- requests -> jobs ----

    def prepare(self, params: GenerationParams, *, n_iter: int = 1, model: str | None = None,
                save_steps: bool = False, refiner: str | None = None) -> GenerationRequest:
        """Check everything that can be checked without running a network; raise ParameterError if not."""
        limit = self.settings.max_prompt_chars
        for name in ("prompt", "negative_prompt"):
            if len(getattr(params, name)) > limit:
                raise ParameterError(f"{name} is {len(getattr(params, name))} characters; the limit is {limit}")
        if not isinstance(n_iter, int) or n_iter < 1:
            raise ParameterError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        if params.batch_size * n_iter > self.settings.max_images:
            raise ParameterError(
                f"batch_size x n_iter = {params.batch_size * n_iter} images; this server makes at most "
                f"{self.settings.max_images} per request")
        tags = extract_lora_tags(params.prompt)[1]
        if tags and self.settings.low_memory:
            raise ParameterError("the prompt names LoRAs (<lora:...>), which this server cannot use: it runs its "
                                 "models in low-memory mode (--low-memory); remove the tags")
        for name, _ in tags:
            self.loras.path(name)  # an unknown or invalid name is a 422 now, not a failed job later
        model = self.registry.resolve(model or self.model_name).name
        config = self.registry.config(model)
        params = params.resolved(config)
        flops = self.limits.check(config, params, n_iter=n_iter, save_steps=save_steps)
        if refiner is not None:
            refiner = self.registry.resolve(refiner).name
            refiner_config = self.registry.config(refiner)
            refiner_params = check_refiner(config, refiner_config, params)
            # Any share of the steps may run on the refiner (refiner_switch_at 0: all): the request is priced,
            # and bounded, as if every step ran on the costlier of the two models.
            flops = max(flops, self.limits.check(refiner_config, refiner_params, n_iter=n_iter,
                                                 save_steps=save_steps))
        return GenerationRequest(params, model, n_iter, save_steps, flops, refiner=refiner)

    def submit(self, request: GenerationRequest, job_id: str | None = None) -> Job:
        job = Job(work=lambda job: run_generation(self.registry, request, job, self.loras, self.limits),
                  time_limit=self.limits.time_limit, interrupt_grace=self.settings.interrupt_grace_s)
        if job_id is not None:
            if not JOB_ID.fullmatch(job_id):
                raise ParameterError(f"force_task_id {job_id!r}: use 1-100 letters, digits or _-.:()")
            job.id = job_id
        return self.queue.submit(job)

    async def run(self, request: GenerationRequest, job_id: str | None = None, client=None) -> GenerationOutput:
        """Queue the request and wait (without holding a thread) for its output. With `client` (the
        Starlette request), a client that goes away takes its job with it: cancelled while it waits,
        aborted while it runs."""
        job = self.submit(request, job_id)
        return await self._wait(job, client)

    async def _wait(self, job: Job, client):
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if client is not None and await client.is_disconnected():
                log.info("job %s: its client went away; %s", job.id,
                         "cancelled" if self.queue.cancel(job) else "stopping it")
                job.stop("disconnected")
                raise ClientGoneError("the client disconnected")

    async def switch_model(self, name: str) -> str:
        """Load model `name` on the worker (in turn with the generation jobs) and make it the default."""
        entry = self.registry.resolve(name)
        await asyncio.wrap_future(self.queue.submit(self._load_job(entry.name)).future)
        self.model_name = entry.name
        return entry.name

    def _load_job(self, name: str) -> Job:
        def load(job: Job) -> None:
            model, _ = self.registry.load(name)
            self.limits.calibrate(model)

        return Job(work=load, kind="load-model")

    # ---- life cycle ----

    async def start(self) -> None:
        """Load the startup model on the worker thread, so that the first request does not wait for it and a
        missing model stops the server at once."""
        loading = asyncio.wrap_future(self.queue.submit(self._load_job(self.model_name)).future)
        while not loading.done():  # a SIGTERM while a slow model loads must not wait for it
            if self._shutdown_started.is_set():
                return
            await asyncio.wait({loading}, timeout=0.2)
        loading.result()  # a model that cannot load stops the server here

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new jobs, cancel waiting ones, let the running one finish within the grace time."""
        if not self._shutdown_started.is_set():
            self._shutdown_started.set()
            log.info("shutting down: the running job gets %.0f s to finish", self.settings.shutdown_grace_s)
            self.queue.close(self.settings.shutdown_grace_s, wait=False)

    def stop(self) -> None:
        self.begin_shutdown()
        self.queue.close(self.settings.shutdown_grace_s, wait=True, join_timeout=self.settings.shutdown_grace_s + 2)
