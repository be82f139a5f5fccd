"""Score an image against the scene its prompt asks for, by plain image analysis (no learned model).

Pipeline:
1. Label each pixel with its nearest palette colour in CIELAB, then take a 3x3 majority vote (removes
   noise and most one-pixel rings of in-between colours at blurred edges).
2. Background = the most common label on the image border.
3. Blobs = connected components of each shape colour that contrasts with the background, minus the thick
   rims a blur leaves around a shape in a third colour (orange on black blurs through brown).
4. Each blob is read as a soft coverage map (pixel = mix of shape and background colour). For every
   outline the renderer knows, place it where a shape of that area and centroid would sit (blur keeps
   both), and compare by soft IoU, also against blurred versions of the outline. The best fit gives the
   shape, its box gives size (longer side vs the small/large midpoint) and position (third of the image).
5. Prompt objects are matched to blobs by best agreement (shape first, then colour), and every attribute
   the prompt states is checked.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdlab.errors import ParameterError
from sdlab.shapes.captions import caption, parse_prompt
from sdlab.shapes.render import outline_geometry, shape_coverage
from sdlab.shapes.world import (
    EVAL_STREAM, PALETTE, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec, colours_allowed_on, sample_scene,
    srgb_to_lab,
)

logger = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "count", "size", "position", "relation", "background", "all")
_COLOUR_NAMES = tuple(PALETTE)
_PALETTE_LAB = srgb_to_lab(np.array([PALETTE[c] for c in _COLOUR_NAMES]))  # (K, 3)
_LARGE_EXTENT = SIZES["small"] + SIZES["large"]  # box side halfway between small and large boxes
_MIN_AREA = 0.004  # of the image area: a small star covers ~0.018, specks of noise far less
_MIN_SHAPE_IOU = 0.35  # rims and slivers fit no outline; even a clumsy blob fits a circle far better
_RELATION_MARGIN = 0.1  # fraction of the image side by which "above" must be above
_MAX_CANDIDATES = 8  # largest blobs considered when matching prompt objects
_TEMPLATE_BLURS = (0.0, 0.8, 1.5)  # Gaussian sigmas (pixels) at which outlines are also tried
_SKIRT_WIDTH = 4  # pixels around a blob that its blurred edge may reach
_RIM_WIDTH = 3  # pixels: how far a blurred rim reaches out from its shape
_RIM_FRACTION = 0.8  # a rim lies almost entirely within that reach
_MIX_TOLERANCE = 18.0  # sRGB distance from the shape-background mixing line that still counts as a mix


@dataclass(frozen=True)
class Detection:
    """A shape found in an image. `centre` (x, y) and `extent` (longer box side) are fractions of the side."""

    colour: str
    shape: str
    size: str
    position: str
    centre: tuple[float, float]
    extent: float
    area: float  # soft area in pixels
    shape_iou: float  # soft IoU with the best-fitting outline


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[Detection, ...]  # largest first


# ---- image -> analysis ----

def to_rgb_array(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, a uint8 array, a float array in [0, 1], or a torch tensor
    ((3, H, W) or (H, W, 3), floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # a torch tensor; torch itself stays an optional dependency
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ParameterError(f"evaluate: expected an RGB image (H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    return array


def nearest_palette_labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's nearest colour in CIELAB."""
    lab = srgb_to_lab(rgb)  # (H, W, 3)
    distances = np.linalg.norm(lab[:, :, None, :] - _PALETTE_LAB[None, None], axis=-1)  # (H, W, K)
    return distances.argmin(axis=-1)


def majority_filter(labels: np.ndarray) -> np.ndarray:
    """Each pixel takes the most common label of its 3x3 neighbourhood: removes speckle noise and the
    one-pixel rings of in-between colours (red on white blurs through pink) around blurred edges."""
    one_hot = labels[..., None] == np.arange(len(_COLOUR_NAMES))  # (H, W, K)
    return _box3_sum(one_hot.astype(np.int32)).argmax(axis=-1)


def _box3_sum(values: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (edges replicated); works on (H, W, ...) arrays."""
    pad = np.pad(values, [(1, 1), (1, 1)] + [(0, 0)] * (values.ndim - 2), mode="edge")
    h, w = values.shape[:2]
    return sum(pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as bool masks. Labels spread by repeated 3x3 minimum, which
    is plenty fast at 64-128 pixels and needs nothing beyond numpy."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        pad = np.pad(labels, 1, constant_values=big)
        spread = np.min([pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        spread = np.where(mask, spread, big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    return [labels == value for value in np.unique(labels[mask])]


def _has_core(component: np.ndarray) -> bool:
    """True if some pixel has its whole 3x3 neighbourhood inside: thin edge rings have none."""
    return bool((_box3_sum(component.astype(np.int32)) == 9).any())


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _box3_sum(mask.astype(np.int32)) > 0
    return mask


def coverage_estimate(rgb: np.ndarray, colour_rgb: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: the fraction of each pixel a shape of `colour_rgb` covers, reading the pixel as a
    linear mix of shape and background colour (what anti-aliasing and blur make). Unlike a hard mask it
    keeps the area and centroid of a blurred shape."""
    direction = colour_rgb - background_rgb  # (3,)
    mix = (rgb.astype(np.float64) - background_rgb) @ direction / max(direction @ direction, 1.0)
    return np.clip(mix, 0.0, 1.0)


def _grow_regions(masks: list[np.ndarray], steps: int) -> list[np.ndarray]:
    """Grow all masks together by `steps` 3x3 dilations; a pixel goes to the first mask that reaches it,
    so each blob gets its own blurred skirt and never a neighbour's."""
    regions = [m.copy() for m in masks]
    for _ in range(steps):
        claimed = np.any(regions, axis=0) if regions else None
        grown = [_dilate(r, 1) & ~claimed for r in regions]
        for region, new in zip(regions, grown):
            region |= new
            claimed |= new
    return regions


def describe_blob(rgb: np.ndarray, component: np.ndarray, colour: str, background_rgb: np.ndarray,
                  region: np.ndarray) -> Detection:
    """Classify one blob: fit every outline to its coverage map by area and centroid, keep the best.
    `region` is the blob plus its blurred skirt."""
    core = _box3_sum(component.astype(np.int32)) == 9
    colour_rgb = np.median(rgb[core].astype(np.float64), axis=0)
    coverage = coverage_estimate(rgb, colour_rgb, background_rgb) * region
    if coverage.sum() < 1.0:  # colour and background indistinguishable: fall back to the hard mask
        coverage = component.astype(np.float64)
    fits = {shape: _fit_outline(coverage, shape) for shape in SHAPES}
    shape = max(fits, key=lambda s: fits[s][0])
    iou, (cx, cy, radius) = fits[shape]
    side = rgb.shape[0]
    centre, extent = (cx / side, cy / side), 2 * radius / side
    size = "large" if extent > _LARGE_EXTENT else "small"
    return Detection(colour, shape, size, position_of(centre), centre, extent, float(coverage.sum()), iou)


def _fit_outline(coverage: np.ndarray, shape: str) -> tuple[float, tuple[float, float, float]]:
    """Soft IoU of `shape` placed where a shape of the blob's area and centroid would sit, and that
    placement (box centre x, y and half-side, in pixels)."""
    area = coverage.sum()
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]] + 0.5  # pixel centres
    fill, (offset_x, offset_y) = outline_geometry(shape)
    radius = np.sqrt(area / (4 * fill))
    cx = (xs * coverage).sum() / area - offset_x * radius
    cy = (ys * coverage).sum() / area - offset_y * radius
    window = _window_around(coverage, (cx - radius, cy - radius, cx + radius, cy + radius))
    x0, y0, x1, y1 = window
    box = (cx - radius - x0, cy - radius - y0, cx + radius - x0, cy + radius - y0)  # window coordinates
    sharp = shape_coverage(shape, box, x1 - x0, y1 - y0)
    observed = _crop_padded(coverage, window)
    iou = max(_soft_iou(observed, _gaussian_blur(sharp, sigma)) for sigma in _TEMPLATE_BLURS)
    return iou, (float(cx), float(cy), float(radius))


def _window_around(coverage: np.ndarray, box: tuple[float, float, float, float], margin: int = 3):
    """Integer (x0, y0, x1, y1) holding both the blob and `box`, plus room for a blurred template."""
    rows, cols = np.nonzero(coverage)
    return (
        int(np.floor(min(cols.min(), box[0]))) - margin, int(np.floor(min(rows.min(), box[1]))) - margin,
        int(np.ceil(max(cols.max() + 1, box[2]))) + margin, int(np.ceil(max(rows.max() + 1, box[3]))) + margin,
    )


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zero padding; sigma 0 returns the input."""
    if sigma == 0:
        return values
    kernel = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = values.shape
    padded = np.pad(values, 3)
    rows = sum(k * padded[:, i:i + w] for i, k in enumerate(kernel))  # (h + 6, w)
    return sum(k * rows[i:i + h] for i, k in enumerate(kernel))  # (h, w)


def _crop_padded(values: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """values[y0:y1, x0:x1], with zeros where the window leaves the image."""
    x0, y0, x1, y1 = window
    out = np.zeros((y1 - y0, x1 - x0), dtype=values.dtype)
    h, w = values.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = values[sy0:sy1, sx0:sx1]
    return out


def position_of(centre: tuple[float, float]) -> str:
    """Name of the 3x3 grid cell (thirds of the image) holding `centre`."""
    column, row = (min(max(int(v * 3), 0), 2) for v in centre)
    return next(name for name, cell in POSITIONS.items() if cell == (column, row))


def analyze(image) -> Analysis:
    """Find the background colour and every shape-coloured blob in an image."""
    rgb = to_rgb_array(image)
    if rgb.shape[0] != rgb.shape[1]:
        raise ParameterError(f"evaluate: images must be square, got {rgb.shape[1]}x{rgb.shape[0]}")
    labels = majority_filter(nearest_palette_labels(rgb))
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background_index = np.bincount(border).argmax()
    background_rgb = np.median(rgb[labels == background_index].astype(np.float64), axis=0)
    blobs = _drop_blurred_edges(rgb, _find_blobs(labels, background_index), background_rgb)
    regions = _grow_regions([mask for _, mask in blobs], _SKIRT_WIDTH)
    detections = [
        describe_blob(rgb, mask, colour, background_rgb, region) for (colour, mask), region in zip(blobs, regions)
    ]
    detections = [d for d in detections if d.shape_iou >= _MIN_SHAPE_IOU]
    detections.sort(key=lambda d: -d.area)
    return Analysis(_COLOUR_NAMES[background_index], tuple(detections))


def _drop_blurred_edges(
    rgb: np.ndarray, blobs: list[tuple[str, np.ndarray]], background_rgb: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """Remove blobs that are the blurred rim of another blob: pixels mixing its colour with the background
    can be nearest to a third palette colour (orange on black blurs through brown, red on white through
    pink) and form a thick ring. Such a blob hugs the other one and its colour lies between the other's
    and the background's; a real shape of that colour is not wrapped around a neighbour."""
    medians = [np.median(rgb[mask].astype(np.float64), axis=0) for _, mask in blobs]
    reaches = [_dilate(mask, _RIM_WIDTH) for _, mask in blobs]
    keep = []
    for i, (colour, mask) in enumerate(blobs):
        rim_of_another = any(
            j != i and (mask & reach).sum() >= _RIM_FRACTION * mask.sum()
            and _lies_between(medians[i], medians[j], background_rgb)
            for j, reach in enumerate(reaches)
        )
        if not rim_of_another:
            keep.append((colour, mask))
    return keep


def _lies_between(colour: np.ndarray, end: np.ndarray, start: np.ndarray) -> bool:
    """True if `colour` is close to a proper mix start + t * (end - start), 0.1 < t < 0.9 (sRGB units)."""
    direction = end - start
    t = float((colour - start) @ direction / max(direction @ direction, 1.0))
    residual = np.linalg.norm(colour - (start + t * direction))
    return 0.1 < t < 0.9 and residual < _MIX_TOLERANCE


def _find_blobs(labels: np.ndarray, background_index: int) -> list[tuple[str, np.ndarray]]:
    """(colour, mask) of every connected patch of a shape colour big and thick enough to be a shape."""
    min_area = _MIN_AREA * labels.size
    blobs = []
    # Colours too close to the background are never drawn on it; their pixels are background noise.
    for colour in colours_allowed_on(_COLOUR_NAMES[background_index]):
        mask = labels == _COLOUR_NAMES.index(colour)
        if mask.sum() < min_area:
            continue
        for component in connected_components(mask):
            if component.sum() >= min_area and _has_core(component):
                blobs.append((colour, component))
    return blobs


# ---- analysis + spec -> scores ----

_OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")
# Prompt objects are identified by shape first, then colour: "a red circle" drawn blue is a blue circle
# with the wrong colour, and a red circle + blue square drawn with colours swapped fails on colour.
_MATCH_WEIGHTS = {"shape": 8, "colour": 6, "position": 2, "size": 1}


def score(spec: SceneSpec, image) -> dict[str, bool]:
    """Per attribute the prompt states, whether the image shows it; "count" is always scored and "all"
    is the conjunction."""
    return score_analysis(spec, analyze(image))


def score_analysis(spec: SceneSpec, analysis: Analysis) -> dict[str, bool]:
    """`score` on an image already analysed (to check one image against several specs)."""
    matched = _match(spec.objects, analysis.objects[:_MAX_CANDIDATES])
    scores = {"count": len(analysis.objects) == len(spec.objects)}
    for attribute in _OBJECT_ATTRIBUTES:
        stated = [(want, got) for want, got in zip(spec.objects, matched) if getattr(want, attribute)]
        if stated:
            scores[attribute] = all(_agrees(want, got, attribute) for want, got in stated)
    if spec.relation is not None:
        scores["relation"] = None not in matched[:2] and relation_holds(spec.relation, *matched[:2])
    if spec.background is not None:
        scores["background"] = analysis.background == spec.background
    scores["all"] = all(scores.values())
    return {a: scores[a] for a in ATTRIBUTES if a in scores}


def _agrees(want: ObjectSpec, got: Detection | None, attribute: str) -> bool:
    return got is not None and getattr(got, attribute) == getattr(want, attribute)


def _match(wanted: Sequence[ObjectSpec], found: Sequence[Detection]) -> list[Detection | None]:
    """Assign each prompt object a distinct detection (or None) maximising weighted agreement."""
    slots = list(found) + [None] * len(wanted)  # None: left unmatched
    best, best_score = [None] * len(wanted), -1
    for choice in itertools.permutations(range(len(slots)), len(wanted)):
        candidate = [slots[i] for i in choice]
        total = sum(
            _MATCH_WEIGHTS[a] for w, g in zip(wanted, candidate) for a in _OBJECT_ATTRIBUTES
            if getattr(w, a) and _agrees(w, g, a)
        ) + sum(g is not None for g in candidate)  # prefer some match over none
        if total > best_score:
            best, best_score = candidate, total
    return best


def relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    """Whether "a <relation> b" holds between two detections' centres (y grows downwards)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    offsets = {"above": by - ay, "below": ay - by, "left of": bx - ax, "right of": ax - bx}
    return offsets[relation] >= _RELATION_MARGIN


# ---- many prompts ----

@dataclass
class EvalTable:
    """Scores of many (prompt, image) pairs and their per-attribute accuracy."""

    prompts: list[str] = field(default_factory=list)
    scores: list[dict[str, bool]] = field(default_factory=list)
    extra_objects: list[int] = field(default_factory=list)  # objects found minus objects asked for, per image

    def count_errors(self) -> tuple[int, int]:
        """(images with too few objects, images with too many): which way the count attribute fails."""
        return sum(d < 0 for d in self.extra_objects), sum(d > 0 for d in self.extra_objects)

    def accuracy(self) -> dict[str, tuple[int, int]]:
        """attribute -> (correct, scored), for attributes scored at least once."""
        result = {}
        for attribute in ATTRIBUTES:
            values = [s[attribute] for s in self.scores if attribute in s]
            if values:
                result[attribute] = (sum(values), len(values))
        return result

    def to_text(self) -> str:
        lines = [f"{'attribute':<11} {'accuracy':>8}  correct/scored"]
        for attribute, (correct, scored) in self.accuracy().items():
            lines.append(f"{attribute:<11} {correct / scored:>8.1%}  {correct}/{scored}")
        if self.extra_objects:
            fewer, more = self.count_errors()
            lines.append(f"count errors: {fewer} with too few objects, {more} with too many")
        return "\n".join(lines)


def evaluate(prompts: Sequence[str], images: Sequence) -> EvalTable:
    """Score each image against its prompt; prompts outside the grammar raise PromptError."""
    if len(prompts) != len(images):
        raise ParameterError(f"evaluate: {len(prompts)} prompts but {len(images)} images; give one each")
    table = EvalTable()
    for prompt, image in zip(prompts, images):
        spec, analysis = parse_prompt(prompt), analyze(image)
        table.prompts.append(prompt)
        table.scores.append(score_analysis(spec, analysis))
        table.extra_objects.append(len(analysis.objects) - len(spec.objects))
    return table


def contact_sheet(images: Sequence, labels: Sequence[str], path, columns: int = 8, scale: int = 2) -> Path:
    """Save a PNG grid of `images`, each upscaled `scale` times with its label wrapped underneath."""
    if len(images) != len(labels) or not images:
        raise ParameterError(f"contact_sheet: need one label per image, got {len(images)} images and "
                             f"{len(labels)} labels")
    tiles = [Image.fromarray(to_rgb_array(im)) for im in images]
    cell = max(t.width for t in tiles) * scale
    font = ImageFont.load_default()
    wrapped = [_wrap(label, font, cell - 4) for label in labels]
    line_height = 12
    text_height = line_height * max(len(w) for w in wrapped) + 4
    rows = -(-len(tiles) // columns)
    # Light gray, so that white-background tiles keep visible edges.
    sheet = Image.new("RGB", (columns * (cell + 4), rows * (cell + text_height + 4)), (215, 215, 215))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x, y = (i % columns) * (cell + 4) + 2, (i // columns) * (cell + text_height + 4) + 2
        sheet.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 2 + j * line_height), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width; explicit newlines are kept."""
    lines = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            trial = f"{current} {word}".strip()
            if current and font.getlength(trial) > width:
                lines.append(current)
                trial = word
            current = trial
        lines.append(current)
    return lines


@dataclass(frozen=True)
class EvalReport:
    table: EvalTable
    text: str
    contact_sheet: Path


def run_eval(
    generate_fn: Callable[[list[str]], Sequence], prompts: Sequence[str], out_dir, batch_size: int = 16
) -> EvalReport:
    """Generate an image per prompt with `generate_fn(list_of_prompts) -> images`, score them, and write
    `report.txt` and `contact_sheet.png` under `out_dir`. The backbone of `sdlab eval`."""
    for prompt in prompts:
        parse_prompt(prompt)  # fail before spending time generating
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        images.extend(generate_fn(batch))
        logger.info("generated %d/%d evaluation images", len(images), len(prompts))
    table = evaluate(prompts, images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [_verdict_label(p, s) for p, s in zip(prompts, table.scores)]
    sheet = contact_sheet(images, labels, out_dir / "contact_sheet.png")
    text = table.to_text()
    (out_dir / "report.txt").write_text(text + "\n")
    logger.info("shapes-world evaluation of %d prompts:\n%s", len(prompts), text)
    return EvalReport(table, text, sheet)


def _verdict_label(prompt: str, scores: dict[str, bool]) -> str:
    failed = [a for a, ok in scores.items() if not ok and a != "all"]
    return f"{prompt}\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}"


# ---- evaluation prompts ----

EVAL_KINDS = ("single", "relation", "heldout")


def eval_prompts(seed: int = 0, n: int = 200, kind: str = "single") -> list[str]:
    """`n` distinct evaluation prompts.

    "single": one shape, in-distribution attributes; "relation": two shapes related by above/below/left
    of/right of; "heldout": one or two shapes, at least one of a colour x shape pair the training split
    never contains. Unseen: prompt i comes from the random stream [EVAL_STREAM, seed, kind, i], which the
    training set (streams [TRAIN_STREAM, ...]) never draws from, so the scenes and wordings are fresh
    draws. For "single" and "relation" the attribute combinations are in-distribution and a short caption
    string may well also occur in training (one-shape captions are few); "heldout" prompts are strictly
    unseen in content, not only in wording.
    """
    if kind not in EVAL_KINDS:
        raise ParameterError(f"eval_prompts: kind={kind!r} is not one of {EVAL_KINDS}")
    prompts: dict[str, None] = {}  # insertion-ordered set
    for i in itertools.count():
        if len(prompts) == n:
            return list(prompts)
        if i > 100 * n + 1000:
            raise ParameterError(f"eval_prompts: cannot find {n} distinct {kind!r} prompts; ask for fewer")
        rng = np.random.default_rng([EVAL_STREAM, seed, EVAL_KINDS.index(kind), i])
        prompts[_eval_prompt(rng, kind)] = None
    raise AssertionError("unreachable")


def _eval_prompt(rng: np.random.Generator, kind: str) -> str:
    if kind == "single":
        return caption(sample_scene(rng, "train", n_objects=1), rng)
    if kind == "relation":
        return caption(sample_scene(rng, "train", n_objects=2), rng, mode="relation")
    n_objects = int(rng.integers(1, 3))
    scene = sample_scene(rng, "heldout", n_objects=n_objects)
    return caption(scene, rng, mode="relation" if n_objects == 2 else "list")
