"""Reading and writing tensor files safely.

The format is decided from the file's first bytes, never from its name: a `.ckpt` may hold safetensors and a
`.safetensors` may be a renamed pickle.

- safetensors: an 8-byte little-endian header length, then a JSON header that starts with `{`, then the
  raw tensor bytes. Every header entry (dtype, shape, byte range) is checked against the others and against
  the file size before anything is read, and the tensors are memory-mapped (no copy: pages are read from
  disk when first touched).
- torch zip checkpoints (`torch.save` since 1.6) start with `PK\\x03\\x04`; legacy torch pickles with the
  pickle protocol byte `\\x80`. Both go through `torch.load(weights_only=True)`, which rebuilds tensors and
  plain containers but refuses to import or call anything else, so a malicious pickle cannot run code.
  A zip's directory is read first: `torch.save` stores its members uncompressed, so a zip whose members
  would inflate to more than `ZIP_INFLATION_LIMIT` times the file's size (a "zip bomb") is refused before
  torch inflates anything. Legacy pickles need no such check: torch allocates a storage before it reads the
  storage's bytes from the file, and an absurd size fails that allocation (or reading it) at once.

Every problem is a one-line `CheckpointError` that names the file and says what kind of thing is wrong; no
message quotes the file's content (a server must not become a way to read files), except the names of
tensors, which are shown only when they look like parameter names (`quoted_key`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import stat
import struct
import zipfile
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
# A Stable Diffusion file's header is ~150 KB (about 1,100 tensors), SDXL's ~300 KB; the safetensors library
# itself allows 100 MB, which would let a header alone hold ~1 GB of parsed JSON.
MAX_SAFETENSORS_HEADER = 16 * 2**20
MAX_TENSOR_RANK = 16  # Stable Diffusion's weights have at most 4 dimensions
# torch.save stores zip members uncompressed (total ~= the file size); deflate's best ratio is ~1000x.
ZIP_INFLATION_LIMIT = 64

# Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,160}")


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
    size = check_regular_file(path, "checkpoint file")
    if size == 0:
        raise CheckpointError(f"{path}: an empty file (0 bytes), not a checkpoint")
    head = _read_head(path, 9)
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == bytes([PICKLE_PROTOCOL_OPCODE]):
        return "torch-pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint: not a safetensors file, torch zip or torch pickle (unrecognised header)"
    )


def check_path(path: Path) -> os.stat_result:
    """`path`'s status (following symlinks), or a `CheckpointError` saying why there is none."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or folder") from None
    except ValueError:  # a NUL character in the path
        raise CheckpointError(f"{str(path)!r}: not a valid path (it contains a NUL character)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: a symlink loop (too many levels of symbolic links)") from None
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def check_regular_file(path: Path, what: str = "file") -> int:
    """The size of `path` if it is a regular file (or a symlink to one); otherwise a `CheckpointError`.
    FIFOs, devices and sockets are refused before anything opens them: reading a FIFO waits forever."""
    mode = check_path(path)
    if stat.S_ISDIR(mode.st_mode):
        hint = " (a diffusers folder is read by load_checkpoint)" if what == "checkpoint file" else ""
        raise CheckpointError(f"{path}: is a folder, not a {what}{hint}")
    if not stat.S_ISREG(mode.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket), so not a {what}")
    return mode.st_size


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (JSON configs and indexes)."""
    size = check_regular_file(path, what)
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, too large for a {what} (at most {limit})")
    return _read_head(path, limit)


def quoted_key(name: object) -> str:
    """A tensor name for an error message: quoted when it looks like a parameter name (letters, digits, `_`,
    `.`, `-`), otherwise only described, so that no other text from a file reaches a message."""
    if isinstance(name, str) and _PARAMETER_NAME.fullmatch(name):
        return repr(name)
    return "(a name with unusual characters)"


def _read_head(path: Path, n: int) -> bytes:
    """Up to `n` bytes from the start of `path`, opened without blocking and checked to be a regular file
    once open (so a FIFO swapped in after `check_regular_file` cannot hang the reader either)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise CheckpointError(f"{path}: cannot be opened ({reason})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket)")
        chunks, left = [], n
        while left and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- safetensors ---------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> RawCheckpoint:
    header, data_size = _read_safetensors_header(path)
    metadata = _safetensors_metadata(path, header.pop("__metadata__", None))
    _check_safetensors_entries(path, header, data_size)
    try:
        tensors = load_file(path, device="cpu")  # memory-mapped, one storage per tensor
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        log.debug("%s: safetensors refused the file: %s", path, e)
        raise CheckpointError(f"{path}: corrupted safetensors file (the safetensors library cannot read it)") from e
    return RawCheckpoint(path, "safetensors", tensors, metadata)


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header and the size in bytes of the data section that follows it."""
    file_size = check_regular_file(path, "checkpoint file")
    prefix = _read_head(path, 8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if 8 + length > file_size:
        raise CheckpointError(
            f"{path}: truncated or corrupted safetensors file: the header claims {length} bytes but the file "
            f"has only {file_size - 8} after the length field"
        )
    if length > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"{path}: safetensors header of {length} bytes, more than the {MAX_SAFETENSORS_HEADER} sdlab reads"
        )
    header = _parse_header(path, _read_head(path, 8 + length)[8:])
    return header, file_size - 8 - length


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupted safetensors file: its header is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: corrupted safetensors file: its header is not valid JSON (line {e.lineno}, column {e.colno})"
        ) from None
    except (ValueError, RecursionError):  # e.g. an integer of thousands of digits, or arrays nested too deep
        raise CheckpointError(f"{path}: corrupted safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors file: its header is not a JSON object")
    return header


def _safetensors_metadata(path: Path, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: corrupted safetensors file: its __metadata__ is not a map of strings to strings"
        )
    return dict(metadata)


def _check_safetensors_entries(path: Path, header: Mapping, data_size: int) -> None:
    """Every tensor's dtype, shape and byte range must be consistent, lie inside the file, and the ranges
    must tile the data section exactly (no overlaps, gaps or trailing bytes), as the safetensors format says."""
    spans = sorted((*_entry_span(path, name, entry), name) for name, entry in header.items())
    for _, end, name in spans:
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {quoted_key(name)} ends at byte {end} of the data "
                f"section, which has only {data_size} bytes"
            )
    position = 0
    for begin, end, name in spans:
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupted safetensors file: tensor {quoted_key(name)} {problem}")
        position = end
    if position != data_size:
        raise CheckpointError(
            f"{path}: corrupted safetensors file: {data_size - position} bytes after the last tensor's data"
        )


def _entry_span(path: Path, name: str, entry) -> tuple[int, int]:
    """(begin, end) of one header entry's bytes, after checking its dtype, shape and offsets."""
    where = f"{path}: corrupted safetensors file: tensor {quoted_key(name)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise CheckpointError(f"{where}: unknown dtype; expected one of {', '.join(SAFETENSORS_ITEMSIZE)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_RANK and all(map(_is_count, shape))):
        raise CheckpointError(
            f"{where}: its shape is not a list of at most {MAX_TENSOR_RANK} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(f"{where}: its data_offsets are not two non-negative integers [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: shape {shape} ({dtype}) needs {nbytes} bytes but its offsets are [{begin}, {end}]"
        )
    return begin, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    # Memory-map only a zip whose members are all stored: mmap would hand out a compressed member's raw bytes.
    mmap = _check_torch_zip(path) if fmt == "torch-zip" else False
    obj = _safe_torch_load(path, mmap=mmap)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # A PyTorch Lightning checkpoint (the original CompVis/Stability .ckpt): weights under "state_dict",
        # training facts such as global_step beside it.
        metadata = {str(k): str(v) for k, v in obj.items() if isinstance(v, (int, float, str, bool))}
        obj = obj["state_dict"]
    else:
        metadata = {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = len(obj) - len(tensors)
    if skipped:
        log.debug("%s: ignored %d non-tensor entries", path, skipped)
    sparse = [k for k, v in tensors.items() if v.layout != torch.strided or v.is_quantized]
    if sparse:
        raise CheckpointError(
            f"{path}: {len(sparse)} tensors are sparse or quantized (e.g. {quoted_key(sparse[0])}); sdlab reads "
            f"dense weights only"
        )
    return RawCheckpoint(path, fmt, tensors, metadata)


def _check_torch_zip(path: Path) -> bool:
    """Check a torch zip's directory before torch inflates anything; True when every member is stored."""
    file_size = check_regular_file(path, "checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error):
        raise CheckpointError(
            f"{path}: truncated or corrupted torch zip checkpoint (its zip directory cannot be read)"
        ) from None
    inflated = sum(m.file_size for m in members)
    if inflated > ZIP_INFLATION_LIMIT * file_size:
        raise CheckpointError(
            f"{path}: refused: its zip members would inflate to {inflated} bytes, more than {ZIP_INFLATION_LIMIT} "
            f"times the file's {file_size} (torch.save stores members uncompressed; this looks like a zip bomb)"
        )
    if any(m.header_offset + m.compress_size > file_size for m in members):
        raise CheckpointError(f"{path}: truncated torch zip checkpoint (a member's data runs past the end)")
    return all(m.compress_type == zipfile.ZIP_STORED for m in members)


def _safe_torch_load(path: Path, mmap: bool):
    try:
        if path.name.endswith(".safetensors"):
            # torch.load trusts that extension and would hand the file to safetensors: give it the open
            # file instead (mmap needs a path, so this rare mislabelled file is read into memory).
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        log.debug("%s: torch.load refused it: %s", path, e)
        raise CheckpointError(
            f"{path}: unsafe or unknown pickle content, refused: loading it would import or call something "
            f"other than tensors and plain containers. Convert it to .safetensors with a tool you trust."
        ) from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: corrupted torch checkpoint: it declares tensors too large to hold") from e
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged file can raise nearly anything
        # The message of torch's error may quote the file (pickled names, keys): it goes to the debug log only.
        log.debug("%s: torch.load failed: %s: %s", path, type(e).__name__, e)
        raise CheckpointError(
            f"{path}: corrupted or truncated torch checkpoint (torch.load failed with {type(e).__name__})"
        ) from e
