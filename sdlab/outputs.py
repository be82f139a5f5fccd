"""Writing result files: numbered names that never overwrite, and atomic writes.

Images are named `00001-<seed>.png`, `00002-<seed>.png`, ... in the output folder, as A1111 names them.
A name is claimed by creating the file with O_EXCL, so several processes writing to one folder (a
`torchrun` batch job) never take the same name; the content is then written to a temporary file and
renamed over the claimed (empty) one, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from PIL import Image

from .pngmeta import png_bytes

_NUMBERED = re.compile(r"^(\d{5,})-")
_MAX_TRIES = 10_000


def next_number(folder: Path) -> int:
    """1 + the highest `NNNNN-` prefix in the folder (1 for an empty or new folder)."""
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def claim(path: Path) -> bool:
    """Create `path` empty if no file has that name; False if one does."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def claim_numbered(folder: str | os.PathLike, tag: str, suffix: str = ".png") -> Path:
    """Claim the next free `NNNNN-<tag><suffix>` in `folder` (created if needed) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    number = next_number(folder)
    for _ in range(_MAX_TRIES):
        path = folder / f"{number:05d}-{tag}{suffix}"
        if claim(path):
            return path
        number = max(number + 1, next_number(folder))  # another process took it: look again
    raise FileExistsError(f"{folder}: could not find a free numbered file name")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, folder: str | os.PathLike, *, seed: int, text: str | None = None) -> Path:
    """Save `image` as the next numbered `NNNNN-<seed>.png`, carrying `text` as its parameters chunk."""
    data = png_bytes(image, text)
    path = claim_numbered(folder, str(seed))
    write_bytes_atomic(path, data)
    return path


def sibling_path(path: Path, suffix: str) -> Path:
    """A new file next to `path` named after it (`00003-7.png` -> `00003-7-steps.gif`), never an existing
    one: a numeric tail is added if needed."""
    for i in range(_MAX_TRIES):
        candidate = path.with_name(f"{path.stem}{suffix}" if i == 0 else f"{path.stem}-{i}{suffix}")
        if claim(candidate):
            return candidate
    raise FileExistsError(f"{path.parent}: could not find a free file name for {path.stem}{suffix}")
