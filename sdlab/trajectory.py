"""The denoising trajectory: the sampler's x0 estimate after each step, decoded to images.

Watching noise turn into the image shows what the sampler does: the first steps fix the layout and
colours, the last ones only sharpen detail (the "coarse-to-fine" behaviour described by Ho et al. 2020,
"Denoising Diffusion Probabilistic Models", section 4.3). `TrajectoryRecorder` is a step callback for
`sdlab.generate`; `trajectory_grid` and `trajectory_gif` turn its frames into one picture or an animation.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from .generation import StepInfo, decode_latents
from .images import grid

Frame = list  # the B images of one step


class TrajectoryRecorder:
    """Step callback that decodes the x0 estimate (B, 4, h, w) every `every` steps (and at the last step).

    Decoding costs one VAE decoder pass per recorded step, so for large models record every few steps."""

    def __init__(self, model, every: int = 1):
        self.model, self.every = model, max(1, every)
        self.frames: list[Frame] = []
        self.steps: list[int] = []

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.step == info.total:
            self.frames.append(decode_latents(self.model, info.denoised))
            self.steps.append(info.step)


def chain(*callbacks: Callable | None) -> Callable[[StepInfo], None]:
    """One step callback calling each of `callbacks` (None entries are skipped) in order."""
    live = [c for c in callbacks if c is not None]

    def call_all(info: StepInfo) -> None:
        for callback in live:
            callback(info)

    return call_all


def trajectory_grid(frames: list[Frame]) -> Image.Image:
    """One row per batch image, one column per recorded step (left = noisiest)."""
    columns = len(frames)
    by_row = [frame[i] for i in range(len(frames[0])) for frame in frames]
    return grid(by_row, columns=columns)


def trajectory_gif(frames: list[Frame], frame_ms: int = 150, hold_ms: int = 1200) -> bytes:
    """An animated GIF (looping), each frame showing the batch side by side; the final image is held."""
    pictures = [grid(frame, columns=len(frame)) for frame in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [hold_ms]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations,
                     loop=0, optimize=False)
    return buffer.getvalue()


def trajectory_bytes(frames: list[Frame], kind: str) -> bytes:
    """The trajectory as "gif" (animation) or "grid" (a PNG)."""
    if not frames:
        raise ValueError("no steps were recorded")
    if kind == "gif":
        return trajectory_gif(frames)
    if kind == "grid":
        buffer = io.BytesIO()
        trajectory_grid(frames).save(buffer, format="PNG")
        return buffer.getvalue()
    raise ValueError(f"unknown trajectory format {kind!r}: use 'grid' or 'gif'")
