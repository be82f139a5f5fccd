"""What crosses the wire: base64 PNGs out, base64 PNG/JPEG/WebP (optionally as a data: URL) in, and the
nesting check on JSON bodies.

Client images are untrusted files: only the three formats are opened, the size their header declares is
checked before any pixel is decoded, and every way decoding can fail (bad data, truncation, a compressed
metadata chunk that inflates past PIL's limit, ...) is a ParameterError naming the field, whose message says
what kind of thing is wrong without quoting the file.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re

import numpy as np
from PIL import Image

from ..errors import ParameterError

log = logging.getLogger(__name__)
MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")  # never PIL's others: some hand the file to external programs (EPS)
UNREADABLE = "not a readable image (send a base64 PNG, JPEG or WebP)"


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
    """Image bytes -> a loaded PIL image, or ParameterError naming `field`."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header (and a PNG's early chunks)
    except Image.DecompressionBombError:
        raise ParameterError(f"{field}: the image declares more than {MAX_PIXELS} pixels") from None
    except Exception as error:  # noqa: BLE001 (PIL's decoders raise many kinds on malformed input)
        raise _unreadable(field, error) from None
    if image.width * image.height > MAX_PIXELS:
        raise ParameterError(f"{field}: {image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
    try:
        image.load()
    except Exception as error:  # noqa: BLE001
        raise _unreadable(field, error) from None
    return image


def _unreadable(field: str, error: Exception) -> ParameterError:
    # PIL's own messages may quote bytes of the file: only the kind of failure is told.
    log.debug("%s: image refused (%s)", field, type(error).__name__)
    if isinstance(error, ValueError) and "decompress" in str(error).lower():
        return ParameterError(f"{field}: a compressed chunk of the image inflates past the decoder's limit")
    if isinstance(error, OSError) and "truncated" in str(error).lower():
        return ParameterError(f"{field}: the image data is truncated")
    return ParameterError(f"{field}: {UNREADABLE}")


# ---- JSON nesting ----

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_ALL_BUT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes, chunk: int = 2**20) -> int:
    """How deep a JSON text's arrays and objects nest, without parsing it (brackets inside strings do not
    count). Python's parser recurses once per level; this runs at C speed and in bounded memory, so that a
    body of 100000 `[` is refused before the parser sees it."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _ALL_BUT_BRACKETS)
    depth = deepest = 0
    for start in range(0, len(brackets), chunk):
        codes = np.frombuffer(brackets[start:start + chunk], dtype=np.uint8)
        levels = np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest
