"""The job queue: requests become jobs; one worker thread runs them, one at a time, in arrival order.

A request handler submits a `Job` and awaits `job.future`. The queue is bounded: when `maxsize` jobs are
already waiting, `submit` raises `QueueFullError` (answered 429 with Retry-After). Each job owns its
result, so under any concurrency a request gets exactly its own images.

Shutdown (`close`): new jobs are refused, waiting ones are cancelled (their requests get 503), and the
running job gets `grace` seconds to finish before its sampler is interrupted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError, SdlabError

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[A-Za-z0-9_.:()-]{1,100}")


class QueueFullError(SdlabError):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} jobs are waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDownError(SdlabError):
    """The server is stopping: the job was not run (or was stopped part-way)."""


class DuplicateJobError(ParameterError):
    pass


class JobTimeoutError(SdlabError):
    """The job ran past the server's time limit and was stopped."""


class ClientGoneError(SdlabError):
    """The client of a request disconnected before its job finished (nobody is left to answer)."""


@dataclass
class Job:
    """One unit of work for the worker: `work(job)` runs on the worker thread and returns the result."""

    work: Callable[[Job], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = "generate"
    status: str = "queued"  # queued -> running -> done | failed | cancelled
    step: int = 0  # finished sampler steps, over all batches of the job
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    preview: bytes | None = None  # PNG of the latest x0 estimate, when asked for
    preview_step: int = 0
    want_preview: bool = False
    frames: list[bytes] = field(default_factory=list)  # PNG per recorded step (save_steps)
    frame_steps: list[int] = field(default_factory=list)
    error: str | None = None
    interrupt: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "interrupted" (a client asked), "timeout", "disconnected" or "shutdown"
    stopped_at: float | None = None  # time.monotonic() of the first stop
    time_limit: float | None = None  # seconds the job may run before it is stopped ("timeout")
    interrupt_grace: float = 5.0  # after an "interrupted", seconds left to decode what there is
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.step / self.total if self.total else 0.0

    def stop(self, reason: str) -> None:
        """Ask the job to stop. "interrupted" (A1111's /interrupt) ends sampling after the current step and
        leaves `interrupt_grace` seconds to decode what there is; every other reason aborts at once, between
        two blocks of whichever network runs. A hard reason overrides an earlier "interrupted"."""
        if self.stop_reason in (None, "interrupted"):
            self.stop_reason = reason
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.interrupt.set()

    def should_abort(self) -> bool:
        """What the networks ask between their blocks (`generate(abort=...)`)."""
        if not self.interrupt.is_set():
            return False
        if self.stop_reason != "interrupted":
            return True
        return time.monotonic() - self.stopped_at > self.interrupt_grace

    def eta_seconds(self) -> float:
        if not self.started or not self.step or not self.total:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / self.step * (self.total - self.step)


class JobQueue:
    """A bounded FIFO of jobs and the thread that runs them."""

    def __init__(self, maxsize: int = 8, kept: int = 32):
        self.maxsize = maxsize
        self._waiting: queue.Queue[Job | None] = queue.Queue()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._kept = kept
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.current: Job | None = None
        self.last_job_seconds = 1.0

    # ---- the request side ----

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down and takes no new jobs")
            if job.id in self._jobs:
                raise DuplicateJobError(f"a job with id {job.id!r} already exists; use a fresh id")
            waiting = self.waiting_count()
            if waiting >= self.maxsize:
                raise QueueFullError(waiting, self._retry_after(waiting))
            self._remember(job)
            self._waiting.put(job)
        self.start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def waiting_count(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.status == "queued")

    def position(self, job: Job) -> int:
        """0 = running or finished; n = n jobs are ahead of it (counting the running one)."""
        if job.status != "queued":
            return 0
        with self._lock:
            ids = list(self._jobs)
            ahead = [j for j in ids[: ids.index(job.id)] if self._jobs[j].status in ("queued", "running")]
        return len(ahead)

    def cancel(self, job: Job) -> bool:
        """Cancel a job that has not started; False if it runs or ran already."""
        with self._lock:
            if job.status != "queued":
                return False
            job.status = "cancelled"
            job.future.cancel()
            return True

    def _retry_after(self, waiting: int) -> int:
        return max(1, round(self.last_job_seconds * (waiting + 1)))

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [k for k, j in self._jobs.items() if j.status in ("done", "failed", "cancelled")]
        for key in finished[: max(0, len(finished) - self._kept)]:
            del self._jobs[key]

    # ---- the worker ----

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="sdlab-worker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while (job := self._waiting.get()) is not None:
            if self._begin(job):
                self._execute(job)

    def _begin(self, job: Job) -> bool:
        """Mark the job running, unless it was cancelled meanwhile (by `close`, or by its request going away:
        asyncio cancels a wrapped future that is still pending)."""
        with self._lock:
            if job.status == "cancelled" or not job.future.set_running_or_notify_cancel():
                job.status = "cancelled"
                return False
            job.status, job.started, self.current = "running", time.time(), job
            return True

    def _execute(self, job: Job) -> None:
        timer = None
        if job.time_limit:
            timer = threading.Timer(job.time_limit, job.stop, args=("timeout",))
            timer.daemon = True
            timer.start()
        try:
            result = job.work(job)
        except BaseException as error:  # the worker must survive anything a job does
            job.status, job.error = "failed", str(error)
            if not isinstance(error, SdlabError):
                log.exception("job %s failed", job.id)
            self._finish(job)
            job.future.set_exception(error)
        else:
            job.status = "done"
            self._finish(job)
            job.future.set_result(result)
        finally:
            if timer is not None:
                timer.cancel()

    def _finish(self, job: Job) -> None:
        """The worker is idle again before the job's requester hears back, so that a /progress call made right
        after a response never sees the finished job as the current one."""
        job.finished, self.current = time.time(), None
        self.last_job_seconds = job.finished - job.started

    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def current_kind(self) -> str:
        job = self.current
        return "idle" if job is None else f"{job.kind} job {job.id}"

    # ---- shutdown ----

    def close(self, grace: float = 10.0, wait: bool = True, join_timeout: float | None = None) -> None:
        """Refuse new jobs, cancel waiting ones, give the running one `grace` seconds, then abort it; with
        `wait`, wait for the worker to end (at most `join_timeout` seconds, default grace + 30)."""
        with self._lock:
            self._closed = True
            for job in list(self._jobs.values()):
                if job.status == "queued":
                    job.status = "cancelled"
                    if not job.future.done():  # (a request that went away cancelled it already)
                        job.future.set_exception(ShuttingDownError("the server shut down before this job ran"))
            self._waiting.put(None)
        running = self.current
        if running is not None:
            timer = threading.Timer(grace, running.stop, args=("shutdown",))
            timer.daemon = True
            timer.start()
        if wait and self._thread is not None:
            self._thread.join(grace + 30 if join_timeout is None else join_timeout)

    @property
    def closed(self) -> bool:
        return self._closed
