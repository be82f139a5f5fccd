"""Named resources: what a user or client *names* (a LoRA in `<lora:name:0.8>`, later an embedding, a
ControlNet, an upscaler) turned into a file, looked up only inside configured folders.

The library (`sdlab.generate`) takes resolved objects: a mapping from names to files or tensors. Turning a
name into a file is the application's job, because only the application knows which folders it may read:

    loras = ResourceFolder("LoRA", ["loras"], LORA_SUFFIXES)
    generate(model, params, named_loras=loras)              # <lora:style:0.8> -> loras/style.safetensors

A name is a plain file name without its suffix: no path separators, no `..`, no leading dot, nothing a
filesystem would read as a path. Lookups list the folders' own entries and pick among them, so a name can
only ever mean a file the folder's owner put there. Errors quote names only (never a path outside the
folders, never whether such a path exists, never a file's content).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from .errors import ParameterError, SdlabError

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# Letters, digits, space and a few punctuation marks; 1-200 characters; not starting with a dot.
_NAME = re.compile(r"[\w\- +=,;()\[\]{}@#&'!~]{1,200}")
_QUOTED_LENGTH = 80  # at most this much of a refused name is repeated in an error


class UnknownResourceError(ParameterError, KeyError):
    """A name that is not valid, or names nothing in the configured folders."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_name(kind: str, name: str) -> str:
    """`name` if it is a plain resource name; else ParameterError saying what a name may contain."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith(".") or name.strip() != name:
        shown = repr(name[:_QUOTED_LENGTH]) if isinstance(name, str) else type(name).__name__
        raise UnknownResourceError(
            f"{kind} name {shown} is not valid: use the file name without its suffix (letters, digits, "
            f"spaces and -_+=,;()[]{{}}@#&'!~, not starting with a dot; no '/', '\\' or '..')")
    return name


class ResourceFolder(Mapping):
    """name -> Path of the files directly inside `folders` whose suffix is one of `suffixes`.

    A read-only Mapping, so that `generate(named_loras=...)` takes it as it takes a dict. Folders are listed
    at each lookup (files added while a server runs are found); the first folder that has a name wins.
    """

    def __init__(self, kind: str, folders: Iterable[str | os.PathLike], suffixes: Iterable[str]):
        self.kind = kind
        self.folders = tuple(Path(f) for f in folders)
        self.suffixes = tuple(suffixes)

    def _entries(self) -> dict[str, Path]:
        entries: dict[str, Path] = {}
        for folder in self.folders:
            try:
                children = sorted(folder.iterdir())
            except OSError:  # a folder that is missing or unreadable offers nothing
                continue
            for path in children:
                if path.suffix.lower() in self.suffixes and not path.name.startswith(".") and path.is_file():
                    entries.setdefault(path.stem, path)
        return entries

    def __getitem__(self, name: str) -> Path:
        return self.path(name)

    def path(self, name: str) -> Path:
        """The file called `name`; UnknownResourceError if the name is not valid or not there."""
        check_name(self.kind, name)
        entries = self._entries()
        if name not in entries:
            raise UnknownResourceError(f"unknown {self.kind} {name!r}; {self._offer(entries)}")
        return entries[name]

    def _offer(self, entries: Mapping[str, Path]) -> str:
        if not self.folders:
            return f"no {self.kind} folder is configured"
        if not entries:
            return f"the {self.kind} folder has none"
        names = sorted(entries)
        return f"available: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


class LoadedResourceFolder(ResourceFolder):
    """A ResourceFolder that hands out the file's tensors instead of its path, and reports a file that
    cannot be read by its name only (the details, with the path, go to the log). For servers: what a
    client sees of a file is its name."""

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        from .checkpoints.io import read_state_dict

        path = self.path(name)
        try:
            return read_state_dict(path)
        except SdlabError as error:
            log.error("%s %r (%s) could not be read: %s", self.kind, name, path, error)
            raise UnknownResourceError(f"{self.kind} {name!r} could not be read; the server log says why") from None
