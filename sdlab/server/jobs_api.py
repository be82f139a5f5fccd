"""sdlab's own job routes: per-job progress with a live preview, and the x0 trajectory of a finished job
(what the web UI's step player shows)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Request, Response

from ..trajectory import trajectory_gif
from .codec import b64, open_image
from .jobs import Job

router = APIRouter(prefix="/sdlab/v1", tags=["sdlab jobs"])


def _job(request: Request, job_id: str) -> Job:
    job = request.app.state.sdlab.queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or finished long enough ago to be forgotten)")
    return job


@router.get("/jobs/{job_id}")
async def job_status(job_id: str, request: Request, preview: bool = True) -> dict:
    """Status, progress and (with `preview`) the latest x0 preview as a base64 PNG."""
    job = _job(request, job_id)
    if preview and job.status == "running":
        job.want_preview = True  # the worker decodes one at its next step
    return {
        "id": job.id, "status": job.status, "step": job.step, "total": job.total, "progress": job.progress,
        "eta_seconds": job.eta_seconds(), "queue_position": request.app.state.sdlab.queue.position(job),
        "preview": b64(job.preview) if preview and job.preview else None, "preview_step": job.preview_step,
        "error": job.error, "steps_recorded": len(job.frames),
    }  # fmt: skip


@router.get("/jobs/{job_id}/steps")
async def job_steps(job_id: str, request: Request, format: str = "json"):
    """The x0 preview after each step (requests made with `save_steps: true`): JSON of base64 PNGs, or
    `?format=gif` for an animation."""
    job = _job(request, job_id)
    if not job.frames:
        raise HTTPException(404, f"job {job_id!r} has no recorded steps (ask with save_steps: true)")
    if format == "gif":
        gif = await asyncio.to_thread(_gif, job.frames)  # up to a frame per step: not on the event loop
        return Response(gif, media_type="image/gif")
    if format != "json":
        raise HTTPException(422, f"format {format!r}: use 'json' or 'gif'")
    return {"id": job.id, "steps": job.frame_steps, "frames": [b64(f) for f in job.frames]}


def _gif(pngs: list[bytes]) -> bytes:
    return trajectory_gif([[open_image(png, "frame")] for png in pngs])
