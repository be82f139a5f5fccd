"""Reading and writing tensor files safely.

The format is decided from the file's first bytes, never from its name: a `.ckpt` may hold safetensors and a
`.safetensors` may be a renamed pickle.

- safetensors: an 8-byte little-endian header length, then a JSON header that starts with `{`, then the
  raw tensor bytes. The header is checked against the file size before anything is read, and the tensors
  are memory-mapped (no copy: pages are read from disk when first touched).
- torch zip checkpoints (`torch.save` since 1.6) start with `PK\\x03\\x04`; legacy torch pickles with the
  pickle protocol byte `\\x80`. Both go through `torch.load(weights_only=True)`, which rebuilds tensors and
  plain containers but refuses to import or call anything else, so a malicious pickle cannot run code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .atomic import atomic_write

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit the safetensors library itself enforces

# Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


@dataclass
class RawCheckpoint:
    """The tensors of one file, plus its non-tensor facts (safetensors `__metadata__`, or the scalars that a
    Lightning `.ckpt` keeps beside its `state_dict`, such as `global_step`), all as strings."""

    path: Path
    format: str  # "safetensors", "torch-zip" or "torch-pickle"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch checkpoint, by name (memory-mapped where possible)."""
    return read_checkpoint(path).tensors


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a tensor file of any supported format; raise `CheckpointError` naming the file and the problem."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, fmt)


def sniff_format(path: Path) -> str:
    """"safetensors", "torch-zip" or "torch-pickle", from the file's first bytes."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder, not a checkpoint file (a diffusers folder is read by load_checkpoint)"
        )
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == bytes([PICKLE_PROTOCOL_OPCODE]):
        return "torch-pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint: it starts with bytes {head[:9]!r}, but a safetensors file has a JSON header "
        f"('{{') after 8 length bytes, a torch zip checkpoint starts with {ZIP_MAGIC!r} and a torch pickle with "
        f"b'\\x80'"
    )


# --- safetensors ---------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> RawCheckpoint:
    header, data_size = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    _check_safetensors_entries(path, header, data_size)
    try:
        tensors = load_file(path, device="cpu")  # memory-mapped, one storage per tensor
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors file: {e}") from e
    return RawCheckpoint(path, "safetensors", tensors, {str(k): str(v) for k, v in metadata.items()})


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header and the size in bytes of the data section that follows it."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_SAFETENSORS_HEADER or 8 + length > file_size:
        raise CheckpointError(
            f"{path}: truncated or corrupted safetensors file: the header claims {length} bytes but the file "
            f"has only {file_size - 8} after the length field"
        )
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors file: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors file: its header is not a JSON object")
    return header, file_size - 8 - length


def _check_safetensors_entries(path: Path, header: Mapping, data_size: int) -> None:
    """Every tensor's dtype, shape and byte range must be consistent and lie inside the file."""
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = SAFETENSORS_ITEMSIZE[dtype]
            nbytes = math.prod(int(n) for n in shape) * itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: corrupted safetensors file: bad header entry for tensor {name!r}: {entry!r}"
            ) from e
        if not 0 <= begin <= end or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: corrupted safetensors file: tensor {name!r} of shape {shape} ({dtype}) needs {nbytes} "
                f"bytes but its offsets are [{begin}, {end}]"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes"
            )


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` to a safetensors file atomically (see `atomic.atomic_write`)."""
    tensors = _unshared(tensors)
    with atomic_write(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
    return Path(path)


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (e.g. the q/k/v views of one fused OpenCLIP matrix):
    give each such tensor its own contiguous copy; everything else is passed through untouched."""
    owners: dict[int, int] = {}
    for t in tensors.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    out = {}
    for name, t in tensors.items():
        shared = t.numel() and owners[t.untyped_storage().data_ptr()] > 1
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return out


# --- torch.load -----------------------------------------------------------------------------------------


def _read_torch(path: Path, fmt: str) -> RawCheckpoint:
    obj = _safe_torch_load(path, mmap=fmt == "torch-zip")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # A PyTorch Lightning checkpoint (the original CompVis/Stability .ckpt): weights under "state_dict",
        # training facts such as global_step beside it.
        metadata = {str(k): str(v) for k, v in obj.items() if isinstance(v, (int, float, str, bool))}
        obj = obj["state_dict"]
    else:
        metadata = {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = len(obj) - len(tensors)
    if skipped:
        log.debug("%s: ignored %d non-tensor entries", path, skipped)
    return RawCheckpoint(path, fmt, tensors, metadata)


def _safe_torch_load(path: Path, mmap: bool):
    try:
        if path.name.endswith(".safetensors"):
            # torch.load trusts that extension and would hand the file to safetensors: give it the open
            # file instead (mmap needs a path, so this rare mislabelled file is read into memory).
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: unsafe or unknown pickle content, refused: loading it would import or call something "
            f"other than tensors ({_first_line(e)}). Convert it to .safetensors with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, struct.error) as e:
        raise CheckpointError(f"{path}: corrupted or truncated torch checkpoint: {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    return (useful or lines or [type(error).__name__])[0]
