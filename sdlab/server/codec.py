"""Images in JSON: base64 PNGs out, base64 PNG/JPEG/WebP (optionally as a data: URL) in."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from ..errors import ParameterError

MAX_PIXELS = 4096 * 4096


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_image(text: str, field: str, max_bytes: int) -> Image.Image:
    """A client's base64 image -> a loaded PIL image; ParameterError naming `field` if it is not one."""
    if text.startswith("data:"):
        text = text.partition(",")[2]  # data:image/png;base64,<data>
    if len(text) > max_bytes * 4 // 3 + 4:
        raise ParameterError(f"{field}: the image is larger than the server's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(f"{field}: not valid base64") from None
    return open_image(data, field)


def open_image(data: bytes, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ParameterError(f"{field}: {image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ParameterError(f"{field}: not a readable image (send a base64 PNG, JPEG or WebP)") from None
    return image
