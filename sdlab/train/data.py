"""Training data: image folders with captions, the shapes world, aspect-ratio buckets, and the batch order.

An image folder holds images (png, jpg, jpeg, webp, bmp) with captions either in `metadata.jsonl` (lines of
{"file_name": "a/b.png", "text": "..."}, relative to the folder; the Hugging Face `imagefolder` convention)
or in a `.txt` file beside each image. Images that cannot be read (not images, truncated, damaged, or
decompression bombs: more pixels than PIL's limit) and images without a caption are skipped with a warning
and counted in `dataset.skipped`, never silently. Caption files are UTF-8 (a UTF-8 or UTF-16 byte-order mark
is understood); one that is not, or a malformed `metadata.jsonl` line, stops the scan with an error naming
the file and line, since skipping would train on a quietly biased or mis-captioned subset.

Every item is a pure function of (index, epoch, seed): random crops and flips draw from a generator seeded
by those, so any process can load any item and a resumed run sees exactly the data it would have seen.
The order of batches is likewise a function of (seed, epoch) (`BatchOrder`); `DataStream` walks it and its
position is part of a training checkpoint.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ParameterError
from ..images import PIL_READ_ERRORS
from ..shapes import ShapesDataset, ShapesMix

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
Size = tuple[int, int]  # (width, height)


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Crop:
    """Where an item's pixels come from: the image scaled to `resized` (width, height), then the window of the
    target size at (left, top) of the scaled image."""

    resized: Size
    left: int
    top: int


def plan_crop(image_size: Size, size: Size, rng: np.random.Generator | None) -> Crop:
    """Scale (width, height) `image_size` to cover `size`, then a crop: centred, or at a random offset from `rng`
    (two draws, left then top)."""
    width, height = size
    scale = max(width / image_size[0], height / image_size[1])
    resized = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    spare_x, spare_y = resized[0] - width, resized[1] - height
    if rng is None:
        return Crop(resized, spare_x // 2, spare_y // 2)
    return Crop(resized, int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1)))


def apply_crop(image: Image.Image, crop: Crop, size: Size) -> Image.Image:
    image = image.resize(crop.resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image.crop((crop.left, crop.top, crop.left + size[0], crop.top + size[1]))


def fit(image: Image.Image, size: Size, rng: np.random.Generator | None) -> Image.Image:
    """Scale `image` to cover `size` (width, height), then crop: centred, or at a random offset from `rng`."""
    return apply_crop(image, plan_crop(image.size, size, rng), size)


def size_conditions(original: Size, crop: Crop, size: Size, flipped: bool = False) -> dict[str, tuple[int, int]]:
    """SDXL's micro-conditions of an item (Podell et al. 2023, sec. 2.2), all (height, width) or (top, left):
    the image's size before scaling, the crop's top-left corner in the scaled image and the crop's size.
    A mirrored item's crop is the mirrored window, whose left edge is resized width - (left + width), as
    kohya's sd-scripts count it; so a model learns where the visible window lies in the (flipped) image."""
    left = crop.resized[0] - crop.left - size[0] if flipped else crop.left
    return {"original_size": (original[1], original[0]), "crop_top_left": (crop.top, left),
            "target_size": (size[1], size[0])}


# --- aspect-ratio buckets -------------------------------------------------------------------------------


def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[Size]:
    """(width, height) pairs, multiples of `multiple`, of about resolution**2 pixels and aspect ratio at most
    `max_ratio` either way (the NovelAI bucketing scheme)."""
    area = resolution * resolution
    buckets = set()
    for width in range(multiple, 2 * resolution + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and 1 / max_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest (in log ratio) to that of `size`."""
    log_ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))


# --- image folders --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str
    size: Size


@dataclass
class SkipReport:
    """What a folder scan left out, by reason (e.g. "unreadable", "no caption"), with example paths."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: Path) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(path))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def scan_folder(root: str | Path) -> tuple[list[Record], SkipReport]:
    """The usable (image, caption) records of an image folder, sorted by path, and what was skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ParameterError(f"data={str(root)!r}: no such folder; give an image folder or 'shapes'")
    captions = _metadata_captions(root)
    skipped = SkipReport()
    records = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = captions.get(path.relative_to(root).as_posix()) if captions else _sidecar_caption(path)
        size, problem = _image_size(path)
        if problem is not None:
            skipped.add(problem, path)
        elif caption is None:
            skipped.add("no caption", path)
        else:
            records.append(Record(path, caption, size))
    _warn_skipped(root, skipped)
    if not records:
        raise ParameterError(
            f"{root}: no usable images (skipped {dict(skipped.counts)}); put captions in {METADATA_FILE} "
            f"or in a .txt file beside each image ({', '.join(IMAGE_SUFFIXES)})"
        )
    return records, skipped


def _metadata_captions(root: Path) -> dict[str, str] | None:
    path = root / METADATA_FILE
    if not path.is_file():
        return None
    captions = {}
    # JSON Lines are separated by "\n" alone: splitlines() would also cut at U+2028 etc. inside a caption.
    for number, line in enumerate(read_text_file(path).split("\n"), 1):
        if line.strip():
            file_name, text = _metadata_entry(line, path, number)
            captions[Path(file_name).as_posix()] = text
    return captions


def _metadata_entry(line: str, path: Path, number: int) -> tuple[str, str]:
    """(file_name, text) of one metadata.jsonl line; ParameterError naming the file and line otherwise."""
    expected = "expected a JSON object with 'file_name' and 'text' strings"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ParameterError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); {expected}") from None
    except RecursionError:
        raise ParameterError(f"{path}, line {number}: JSON nested too deeply; {expected}") from None
    if not isinstance(entry, dict):
        raise ParameterError(f"{path}, line {number}: a JSON {type(entry).__name__}, not an object; {expected}")
    wrong = [key for key in ("file_name", "text") if not isinstance(entry.get(key), str)]
    if wrong:
        raise ParameterError(f"{path}, line {number}: {' and '.join(map(repr, wrong))} missing or not a string; "
                             f"{expected}")
    return entry["file_name"], entry["text"]


def _sidecar_caption(image_path: Path) -> str | None:
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return None
    return read_text_file(txt).strip()


# Byte-order marks and the codecs they announce (UTF-32's first: its little-endian mark starts as UTF-16's).
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text_file(path: Path) -> str:
    """A caption file's text: UTF-8, or UTF-8/16/32 announced by a byte-order mark. ParameterError naming the
    file and the line of the first undecodable byte otherwise (e.g. a Latin-1 file)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ParameterError(f"{path}: cannot be read ({os.strerror(e.errno) if e.errno else e})") from None
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(encoding, errors="replace").count("\n") + 1
        label = "UTF-8" if encoding == "utf-8" else encoding.upper().replace("-SIG", " (with BOM)")
        raise ParameterError(f"{path}, line {line}: not valid {label} text (at byte {e.start} of the file); save "
                             "it as UTF-8 (or UTF-16 with a byte-order mark)") from None


def _image_size(path: Path) -> tuple[Size | None, str | None]:
    """((width, height) after EXIF orientation, None), or (None, why it is skipped) if the file is not a
    readable image. The image is decoded in full, so a truncated file is caught here, not mid-training."""
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure (and checksums, for PNG)
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).size, None  # exif_transpose decodes the pixels
    except Image.DecompressionBombError:
        return None, "decompression bomb (more pixels than PIL's limit)"
    except PIL_READ_ERRORS as e:
        log.debug("cannot read %s: %s", path, type(e).__name__)
        return None, "unreadable image"


def _warn_skipped(root: Path, skipped: SkipReport) -> None:
    for reason, count in skipped.counts.items():
        log.warning("%s: skipped %d images (%s), e.g. %s", root, count, reason, skipped.examples[reason])


class ImageFolderDataset:
    """Captioned images of a folder, cropped to `resolution` squares or to aspect-ratio buckets.

    `load(index, epoch)` -> {"pixels": (3, H, W) float32 in [-1, 1], "caption": str, "conditions": the item's
    size and crop (`size_conditions`), which SDXL conditions on}.
    """

    def __init__(self, root: str | Path, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                 buckets: Sequence[Size] | None = None, seed: int = 0, records: Sequence[Record] | None = None):
        if records is None:
            records, self.skipped = scan_folder(root)
        else:
            self.skipped = SkipReport()
        self.root, self.records, self.resolution, self.buckets = Path(root), list(records), resolution, buckets
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        square = (resolution, resolution)
        self.sizes = [nearest_bucket(r.size, buckets) if buckets else square for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def deterministic(self) -> bool:
        """Whether an item is the same in every epoch (what caching latents requires)."""
        return self.center_crop and not self.random_flip

    def load(self, index: int, epoch: int = 0) -> dict:
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            with Image.open(record.path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")
        except PIL_READ_ERRORS:
            raise ParameterError(f"{record.path}: became unreadable during training") from None
        size = self.sizes[index]
        crop = plan_crop(image.size, size, None if self.center_crop else rng)
        conditions_of = (image.size, crop, size)  # before resizing: the original (width, height)
        image = apply_crop(image, crop, size)
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            image = ImageOps.mirror(image)
        return {"pixels": to_tensor(image), "caption": record.caption,
                "conditions": size_conditions(*conditions_of, flipped)}

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        """(train, held-out): a seeded `fraction` of the records (at least one) is held out."""
        order = np.random.default_rng([seed, 0xE7A1]).permutation(len(self.records))
        n_eval = max(1, round(fraction * len(self.records)))
        if n_eval >= len(self.records):
            raise ParameterError(f"{self.root}: {len(self.records)} images are too few to hold out {fraction:.0%}")
        held, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
        return self._subset(kept), self._subset(held)

    def _subset(self, indices) -> ImageFolderDataset:
        return ImageFolderDataset(self.root, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                                  buckets=self.buckets, seed=self.seed, records=[self.records[i] for i in indices])


class ShapesSource:
    """The procedural shapes world as a training source; `load(index, epoch)` ignores the epoch (scenes are
    rendered at `resolution` already, and flips or crops would contradict the captions' positions)."""

    deterministic = True

    def __init__(self, resolution: int, length: int, seed: int = 0, split: str = "train", mix: ShapesMix = ShapesMix()):
        self.shapes = ShapesDataset(seed=seed, length=length, size=resolution, split=split, mix=mix)
        self.sizes = None
        self.skipped = SkipReport()

    def __len__(self) -> int:
        return len(self.shapes)

    def load(self, index: int, epoch: int = 0) -> dict:
        image, caption = self.shapes[index]
        side = self.shapes.size
        whole = Crop((side, side), 0, 0)  # rendered at the training size: no scaling, no crop
        return {"pixels": to_tensor(image), "caption": caption,
                "conditions": size_conditions((side, side), whole, (side, side))}


def collate(items: Sequence[dict]) -> dict:
    """Stack pixels (all items of a batch share one size), list the captions and, where every item has them,
    the per-item conditions (dicts, for the family's `conditioner_inputs`)."""
    batch = {"pixels": torch.stack([item["pixels"] for item in items]), "caption": [item["caption"] for item in items]}
    if all("conditions" in item for item in items):
        batch["conditions"] = [item["conditions"] for item in items]
    return batch


# --- batch order ----------------------------------------------------------------------------------------


class BatchOrder:
    """The global batches of each epoch: lists of `batch` indices, a pure function of (seed, epoch).

    With `sizes` (one bucket per item), a batch only holds items of one bucket: each bucket is shuffled and
    cut into batches (an incomplete last batch is dropped), then the batches of all buckets are shuffled.
    """

    def __init__(self, length: int, batch: int, seed: int, sizes: Sequence[Size] | None = None):
        groups: dict[Size | None, list[int]] = {}
        for index in range(length):
            groups.setdefault(sizes[index] if sizes else None, []).append(index)
        self.groups = list(groups.values())
        self.batch, self.seed = batch, seed
        self.batches_per_epoch = sum(len(g) // batch for g in self.groups)
        if self.batches_per_epoch == 0:
            raise ParameterError(
                f"the data set has {length} items, too few for one global batch of {batch} "
                "(batch_size x processes); lower batch_size or add images"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [shuffled[i : i + self.batch] for i in range(0, len(group) - self.batch + 1, self.batch)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class DataStream:
    """An endless stream of global batches over epochs; (epoch, position) is its whole state."""

    def __init__(self, order: BatchOrder):
        self.order = order
        self.epoch, self.position = 0, 0
        self._batches = order.epoch(0)

    def next(self) -> tuple[int, list[int]]:
        """(epoch, indices of the next global batch)."""
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.order.epoch(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return self.epoch, batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self.order.epoch(self.epoch)
