"""Conversions between PIL images and the tensors the networks take.

Pixels in tensors are (B, 3, H, W) in [-1, 1]; masks are (1, 1, H, W) in {0, 1} with 1 = repaint.
Rounding to 8 bits is `round(x * 255)` of the [0, 1] image, as diffusers does, so that images compare
pixel for pixel.

Reading a user's image file goes through `open_image`, which turns whatever PIL raises for a bad file into
one ParameterError naming the file and saying what kind of problem it is (never PIL's message, which can
quote bytes of the file).
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import ParameterError

# What PIL raises for a file it cannot open or decode: OSError (missing, unidentified, truncated), ValueError
# (a PNG text chunk too large), SyntaxError (broken chunks), EOFError and struct.error (cut short), and bombs.
PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def unreadable_reason(error: BaseException) -> str:
    """What is wrong with a file PIL refused (one of PIL_READ_ERRORS), in words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, PermissionError):
        return "cannot be opened (permission denied)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can read (PNG, JPEG, WebP, ...)"
    if isinstance(error, Image.DecompressionBombError):
        return f"declares more than twice PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
    if isinstance(error, ValueError) and "too large" in str(error).lower():
        limit = PngImagePlugin.MAX_TEXT_CHUNK
        return f"a text chunk inflates past PIL's limit of {limit} bytes (a decompression bomb?)"
    return "a damaged or truncated image file"


def open_image(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """The decoded image in `path`; ParameterError naming `name` (default: the path) if it is not one."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except PIL_READ_ERRORS as e:
        raise ParameterError(f"{name or path}: {unreadable_reason(e)}") from None


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
