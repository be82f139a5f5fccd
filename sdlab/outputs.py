"""Writing result files: numbered names that never overwrite, atomic writes, and clear errors.

Images are named `00001-<seed>.png`, `00002-<seed>.png`, ... in the output folder, as A1111 names them.
The content is first written to a temporary file in the same folder and flushed to disk; it then gets its
name with a hard link, which fails instead of replacing a file of that name. So several processes writing
to one folder (a `torchrun` batch job) never take the same name, an existing file is never replaced, and a
reader, a crash or a full disk never leaves a partial or empty file under a final name (only, after a
crash, a hidden `.<name>.<random>.tmp`).

`check_output_folder` is meant to run before any model work: an output folder that cannot be created or
written is reported before minutes are spent generating into it.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .errors import SdlabError
from .pngmeta import png_bytes

_NUMBERED = re.compile(r"^(\d{5,})-")
_MAX_TRIES = 10_000
# What os.link raises on a file system without hard links (FAT, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class OutputError(SdlabError, OSError):
    """An output folder cannot be created or written, or writing a result failed (e.g. a full disk)."""


def check_output_folder(folder: str | os.PathLike, name: str | None = None) -> Path:
    """Create `folder` if needed and check that a file can be created in it; OutputError naming `name`
    (default: the folder) with the reason if not."""
    folder = Path(folder)
    name = name or str(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = _create_temp(folder, "write-check")
        os.close(fd)
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{name}: cannot be an output folder: {_file_in_the_way(folder)} is a file") from None
    except OSError as e:
        raise OutputError(f"{name}: cannot write files in this folder ({_reason(e)})") from None
    return folder


def _file_in_the_way(folder: Path) -> Path:
    """The path itself, or the nearest of its parents, that exists and is not a folder."""
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            return path
    return folder


def next_number(folder: Path) -> int:
    """1 + the highest `NNNNN-` prefix in the folder (1 for an empty or new folder)."""
    numbers = [int(m[1]) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def numbered_names(folder: Path, tag: str, suffix: str = ".png") -> Iterator[Path]:
    """Candidate names `NNNNN-<tag><suffix>`, from the next free number on."""
    number = next_number(folder)
    for _ in range(_MAX_TRIES):
        yield folder / f"{number:05d}-{tag}{suffix}"
        number = max(number + 1, next_number(folder))  # another process took it: look again


def sibling_names(path: Path, suffix: str) -> Iterator[Path]:
    """Candidate names for a file next to `path` named after it (`00003-7.png` -> `00003-7-steps.gif`, then
    `00003-7-1-steps.gif`, ...)."""
    for i in range(_MAX_TRIES):
        yield path.with_name(f"{path.stem}{suffix}" if i == 0 else f"{path.stem}-{i}{suffix}")


def write_new_file(data: bytes, names: Iterator[Path]) -> Path:
    """Write `data` under the first of `names` (all in one folder) that no file has, and return it.

    OutputError if the write fails (e.g. a full disk); nothing is then left in the folder.
    """
    first = next(names)
    try:
        tmp = _write_temp(first.parent, first.name, data)
        try:
            for path in itertools.chain([first], names):
                if _publish(tmp, path):
                    return path
            raise FileExistsError(errno.EEXIST, f"no free name after {_MAX_TRIES} tries")
        finally:
            tmp.unlink(missing_ok=True)  # the name holds a link of its own (or the file was renamed)
    except OSError as e:
        raise OutputError(f"{first.parent}: writing {first.name} failed ({_reason(e)}); no partial file "
                          "was left") from None


def save_png(image: Image.Image, folder: str | os.PathLike, *, seed: int, text: str | None = None) -> Path:
    """Save `image` as the next numbered `NNNNN-<seed>.png`, carrying `text` as its parameters chunk."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder ({_reason(e)})") from None
    return write_new_file(png_bytes(image, text), numbered_names(folder, str(seed)))


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new hidden file `.<name>.<random>.tmp` in `folder`, open for writing: (descriptor, path)."""
    tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
    return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), tmp  # the umask applies, as to any file


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    """`data` in a new temporary file in `folder`, flushed to disk; removed again if anything fails."""
    fd, tmp = _create_temp(folder, name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: Path, path: Path) -> bool:
    """Give the written file `tmp` the name `path` unless a file has it; False if one does."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    # No hard links here: claim the name with an empty file, then rename the content over the claim.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _reason(error: OSError) -> str:
    reason = os.strerror(error.errno) if error.errno else type(error).__name__
    if error.errno == errno.ENOSPC:
        reason += "; free some space and run again"
    return reason
