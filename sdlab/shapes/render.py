"""Rasterise shapes-world scenes with Pillow, anti-aliased by supersampling.

Every shape is a polygon (or ellipse) filling the unit box [-1, 1]^2, scaled to the object's box. The
evaluator draws the same outlines as templates (`shape_coverage`), so what is drawn and what is recognised
cannot drift apart.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from sdlab.errors import ParameterError
from sdlab.shapes.world import PALETTE, Scene

SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges, like photos and VAE outputs have


def _star(points: int = 5, inner_ratio: float = 0.45) -> list[tuple[float, float]]:
    """A star pointing up, stretched to fill the unit box exactly."""
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [1.0 if k % 2 == 0 else inner_ratio for k in range(2 * points)]
    xs = np.array([r * math.cos(a) for r, a in zip(radii, angles)])
    ys = np.array([r * math.sin(a) for r, a in zip(radii, angles)])
    xs = 2 * (xs - xs.min()) / (xs.max() - xs.min()) - 1
    ys = 2 * (ys - ys.min()) / (ys.max() - ys.min()) - 1
    return list(zip(xs.tolist(), ys.tolist()))


def _cross(arm: float = 1 / 3) -> list[tuple[float, float]]:
    """A plus sign whose arms are 2*arm wide."""
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
            (-a, -a)]


# Outline of each shape in the unit box, y down; None means an ellipse filling the box.
OUTLINES: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _star(),
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": _cross(),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fill `shape` scaled into the pixel box (x0, y0, x1, y1), edges exclusive."""
    x0, y0, x1, y1 = box
    outline = OUTLINES[shape]
    if outline is None:
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        return
    half_w, half_h, cx, cy = (x1 - x0) / 2, (y1 - y0) / 2, (x0 + x1) / 2, (y0 + y1) / 2
    # PIL fills pixel (i, j) when its centre (i + 0.5, j + 0.5) is inside: shift by half a pixel.
    draw.polygon([(cx + u * half_w - 0.5, cy + v * half_h - 0.5) for u, v in outline], fill=fill)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image."""
    if size < 32:
        raise ParameterError(f"render: size={size} is too small; shapes stay recognisable from 32 pixels up")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        (cx, cy), r = obj.centre, obj.radius
        box = ((cx - r) * big, (cy - r) * big, (cx + r) * big, (cy + r) * big)
        _draw_shape(draw, obj.shape, box, PALETTE[obj.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def shape_coverage(
    shape: str, box: tuple[float, float, float, float], width: int, height: int
) -> np.ndarray:
    """(height, width) float32 in [0, 1]: how much of each pixel `shape` covers when scaled into the
    sub-pixel box (x0, y0, x1, y1). The evaluator's template, drawn exactly as `render` draws."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * SUPERSAMPLE for v in box), 255)
    coverage = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(coverage, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def outline_geometry(shape: str) -> tuple[float, tuple[float, float]]:
    """(fill, centroid): the fraction of its box that `shape` covers, and its centroid relative to the box
    centre in units of the half-side (the triangle's lies below the centre). Measured, not hand-derived."""
    side = 256
    coverage = shape_coverage(shape, (0, 0, side, side), side, side)
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    total = coverage.sum()
    centroid = ((xs * coverage).sum() / total, (ys * coverage).sum() / total)
    return float(total / side**2), tuple(float((c - side / 2) / (side / 2)) for c in centroid)
