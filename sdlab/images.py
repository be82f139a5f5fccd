"""Conversions between PIL images and the tensors the networks take.

Pixels in tensors are (B, 3, H, W) in [-1, 1]; masks are (1, 1, H, W) in {0, 1} with 1 = repaint.
Rounding to 8 bits is `round(x * 255)` of the [0, 1] image, as diffusers does, so that images compare
pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image resized (Lanczos, when the size differs) -> (1, 3, height, width) in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def to_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A mask image (white = repaint) -> (1, 1, height, width) of 0/1, thresholded at one half."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (torch.from_numpy(array) >= 0.5).float()[None, None]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images."""
    array = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size tiled into rows of `columns` (default: as square as possible)."""
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet
