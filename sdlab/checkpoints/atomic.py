"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is first written under a temporary name in the destination's own directory (so the final rename
stays on one filesystem, where it is atomic), flushed to disk with fsync, then renamed into place. A crash
or an exception part-way leaves the destination untouched and no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SdlabError


class DestinationExistsError(SdlabError, FileExistsError):
    """The file or folder to write already exists and overwriting was not asked for."""


def check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raise `DestinationExistsError` if `path` exists and `overwrite` is false; return it as a Path."""
    path = Path(path)
    if path.exists() and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise DestinationExistsError(
            f"{path}: a {kind} with this name already exists; pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)  # the temporary file is created beside the destination
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it is fsynced and renamed to `path`.

        with atomic_write("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = check_destination(path, overwrite)
    if path.is_dir():
        raise DestinationExistsError(f"{path}: is a folder; refusing to replace a folder with a file")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        check_destination(path, overwrite)  # again: something may have appeared while we wrote
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success every file in it is fsynced and the folder is
    renamed to `path` (an existing `path` is replaced only when `overwrite` is true)."""
    path = check_destination(path, overwrite)
    if path.exists() and not path.is_dir():
        raise DestinationExistsError(f"{path}: is a file; refusing to replace a file with a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _replace_folder(tmp, check_destination(path, overwrite))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _replace_folder(new: Path, path: Path) -> None:
    """Rename `new` to `path`. A non-empty folder cannot be renamed over, so an old one is first moved aside
    (the only moment `path` is absent) and deleted once the new one is in place."""
    if not path.exists():
        os.rename(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rename(path, old / path.name)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a directory; there it is skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
