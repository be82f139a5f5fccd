"""Short model hashes for the "Model hash" field of the PNG metadata (as A1111 writes it).

What is hashed:
- a single checkpoint file: the whole file, SHA-256 (so the hash equals A1111's for the same file);
- a diffusers folder: the UNet's weight file(s) `unet/diffusion_pytorch_model.safetensors` (or `.bin`, or
  the shards listed by its index, in name order, as one stream): the UNet is what distinguishes
  fine-tunes, and the VAE / text encoder files are often shared between models;
- a model built in memory (`random:<preset>`): the UNet's tensors (name, dtype, shape, bytes in name
  order), so the same preset always gives the same hash.

The short hash is the first 10 hex digits. File hashes are cached by (path, size, mtime) for the process.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

SHORT = 10
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Full hex SHA-256 of a file (cached while its size and mtime stay the same)."""
    stat = Path(path).stat()
    return _sha256_files((str(Path(path).resolve()),), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_files(paths: tuple[str, ...], size: int, mtime: int) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def hashed_files(source: str | os.PathLike) -> list[Path]:
    """The files whose bytes make a checkpoint's hash (see the module docstring)."""
    source = Path(source)
    if source.is_file():
        return [source]
    from .checkpoints.diffusers_folder import find_weight_files

    return find_weight_files(source / "unet", "diffusion_pytorch_model", None)


def checkpoint_sha256(source: str | os.PathLike) -> str:
    files = hashed_files(source)
    stats = [f.stat() for f in files]
    return _sha256_files(tuple(str(f.resolve()) for f in files), sum(s.st_size for s in stats),
                         max(s.st_mtime_ns for s in stats))


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_sha256(model) -> str:
    """The full hash of a loaded `Model`: of its source file(s) when it has one, else of its UNet weights."""
    if model.source is not None:
        return checkpoint_sha256(model.source)
    return tensors_sha256(model.unet.state_dict())


def short_hash(full: str) -> str:
    return full[:SHORT]


def model_display_name(name: str | os.PathLike | None) -> str:
    """The "Model" field: what was typed for `--model`, minus folders and the file extension
    ("models/v1-5.safetensors" -> "v1-5"); "builtin" and "random:<preset>" stay as they are."""
    if name is None:
        return "builtin"
    text = str(name)
    if text == "builtin" or text.startswith("random:"):
        return text
    path = Path(text)
    return path.stem if path.suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth") else path.name
