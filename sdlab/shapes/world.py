"""The shapes world: its vocabulary, the `Scene` that renderer and evaluator share, and a seeded sampler.

A scene is 1-3 flat shapes on a plain background. Every shape sits in one cell of a 3x3 grid (the nine
named positions), jittered a little inside it, and fills a square box of half-side `radius` (in units of
the image side) around its `centre`. Boxes never overlap, so shapes never touch and colour segmentation
sees each shape as one connected component.

Some colour x shape pairs (`HELDOUT_PAIRS`) never occur in the "train" split, in any object of any scene,
so an evaluation can ask whether a model composes attributes it has only seen apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sdlab.errors import ParameterError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

# sRGB values chosen to stay >= 40 apart in CIELAB, so that they survive a VAE's blur.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (250, 220, 40),
    "green": (40, 170, 60),
    "blue": (30, 90, 230),
    "purple": (150, 40, 170),
    "pink": (250, 130, 200),
    "brown": (130, 80, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (140, 140, 140),
    "beige": (230, 215, 180),
}
SHAPE_COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black",
)
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "beige")

# Half-side of a shape's box, as a fraction of the image side. The evaluator splits at the midpoint.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.17}

# Named grid cells -> (column, row), each in {0, 1, 2}.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
CELL_CENTRES: tuple[float, float, float] = (0.18, 0.5, 0.82)  # fraction of the image side
JITTER = 0.05  # +- fraction of the image side around a cell centre
GAP = 0.03  # minimum empty space between two shape boxes, fraction of the image side

RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Never in the "train" split. Each colour and each shape appears at most once, so every attribute on its
# own is still seen in training. The mission prompt's red circle and blue square stay in-distribution.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("green", "triangle"), ("purple", "circle"), ("yellow", "star"),
    ("orange", "square"), ("pink", "diamond"), ("brown", "cross"),
})

# Seed-space tags: the training set draws scene i from SeedSequence([TRAIN_STREAM, seed, i]) and evaluation
# prompts from [EVAL_STREAM, seed, kind, i], so the two never share a random stream whatever the seeds.
TRAIN_STREAM = 0x7EA1
EVAL_STREAM = 0xE7A1

Split = Literal["train", "heldout", "any"]
SPLITS: tuple[str, ...] = ("train", "heldout", "any")
OBJECT_COUNT_WEIGHTS = (0.4, 0.4, 0.2)  # P(1), P(2), P(3) objects when n_objects is not given
_MIN_CONTRAST = 45.0  # CIELAB distance a shape colour needs from its background


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene. `centre` (x, y) and `radius` are fractions of the image side, y down."""

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """What an image shows: the ground truth that the renderer draws and the evaluator checks against."""

    objects: tuple[ShapeObject, ...]
    background: str

    def spec(self) -> SceneSpec:
        """The fully stated description of this scene (every attribute given, no relation)."""
        objects = tuple(ObjectSpec(o.colour, o.shape, o.size, o.position) for o in self.objects)
        return SceneSpec(objects=objects, background=self.background)


@dataclass(frozen=True)
class ObjectSpec:
    """An intended object. None means the prompt did not say, so any value is fine."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """An intended scene, as a prompt states it: `objects[0] <relation> objects[1]` when relation is set."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255]; (..., 3) -> (..., 3). Euclidean distance in Lab is
    roughly perceptual, which is what "distinguishable colours" means."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.9505, 1.0, 1.089])  # normalised by the D65 white point
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    return np.stack([lightness, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


@functools.lru_cache(maxsize=None)
def colours_allowed_on(background: str) -> tuple[str, ...]:
    """Shape colours that contrast enough with `background` (never the background's own colour)."""
    bg = srgb_to_lab(PALETTE[background])
    return tuple(
        c for c in SHAPE_COLOURS if np.linalg.norm(srgb_to_lab(PALETTE[c]) - bg) >= _MIN_CONTRAST
    )


def sample_scene(
    rng: np.random.Generator,
    split: Split = "train",
    n_objects: int | None = None,
    object_weights: tuple[float, float, float] = OBJECT_COUNT_WEIGHTS,
) -> Scene:
    """Draw a random scene. "train" never contains a held-out colour x shape pair, "heldout" always contains
    at least one, "any" is unrestricted. Without `n_objects`, the count is drawn with the probabilities
    `object_weights` (of 1, 2, 3 objects; they must sum to 1). Deterministic given the generator's state."""
    if split not in SPLITS:
        raise ParameterError(f"sample_scene: split={split!r} is not one of {SPLITS}")
    if n_objects is None:
        n_objects = int(rng.choice(3, p=object_weights)) + 1
    if n_objects not in (1, 2, 3):
        raise ParameterError(f"sample_scene: n_objects={n_objects} must be 1, 2 or 3")
    pairs, background = _sample_appearance(rng, split, n_objects)
    return Scene(objects=_place_objects(rng, pairs), background=background)


def _sample_appearance(
    rng: np.random.Generator, split: str, n_objects: int
) -> tuple[list[tuple[str, str]], str]:
    """(colour, shape) per object, all colours distinct, plus a background that every colour contrasts with."""
    pairs: list[tuple[str, str]] = []
    if split == "heldout":
        pairs.append(_choice(rng, sorted(HELDOUT_PAIRS)))
        background = _choice(rng, [b for b in BACKGROUNDS if pairs[0][0] in colours_allowed_on(b)])
    else:
        background = _choice(rng, BACKGROUNDS)
    while len(pairs) < n_objects:
        used = {colour for colour, _ in pairs}
        colour = _choice(rng, [c for c in colours_allowed_on(background) if c not in used])
        shapes = [s for s in SHAPES if split != "train" or (colour, s) not in HELDOUT_PAIRS]
        pairs.append((colour, _choice(rng, shapes)))
    order = rng.permutation(len(pairs))  # the held-out object should not always come first
    return [pairs[i] for i in order], background


def _place_objects(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> tuple[ShapeObject, ...]:
    """Give each object a size and a free grid cell so that no two boxes overlap; retry on dead ends."""
    while True:
        placed: list[ShapeObject] = []
        for colour, shape in pairs:
            candidate = _place_one(rng, colour, shape, placed)
            if candidate is None:
                break
            placed.append(candidate)
        else:
            return tuple(placed)


def _place_one(
    rng: np.random.Generator, colour: str, shape: str, placed: list[ShapeObject]
) -> ShapeObject | None:
    size = _choice(rng, list(SIZES))
    radius = SIZES[size]
    taken = {o.position for o in placed}
    for position in rng.permutation(list(POSITIONS)):
        if position in taken:
            continue
        centre = _jittered_centre(rng, str(position), radius)
        if all(_boxes_apart(centre, radius, o.centre, o.radius) for o in placed):
            return ShapeObject(shape, colour, size, str(position), centre, radius)
    return None


def _jittered_centre(rng: np.random.Generator, position: str, radius: float) -> tuple[float, float]:
    column, row = POSITIONS[position]
    x, y = np.array([CELL_CENTRES[column], CELL_CENTRES[row]]) + rng.uniform(-JITTER, JITTER, size=2)
    low, high = radius + 0.02, 1.0 - radius - 0.02  # keep the whole box inside the image
    return float(np.clip(x, low, high)), float(np.clip(y, low, high))


def _boxes_apart(c1: tuple[float, float], r1: float, c2: tuple[float, float], r2: float) -> bool:
    """True when two square boxes are separated by at least GAP along some axis."""
    needed = r1 + r2 + GAP
    return abs(c1[0] - c2[0]) >= needed or abs(c1[1] - c2[1]) >= needed


def true_relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """The relations "a <relation> b" that hold by grid cell (objects in different rows/columns)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    relations = []
    if ay != by:
        relations.append("above" if ay < by else "below")
    if ax != bx:
        relations.append("left of" if ax < bx else "right of")
    return relations


def _choice(rng: np.random.Generator, options):
    """One element of a non-empty sequence (numpy's choice would turn tuples into arrays)."""
    return options[int(rng.integers(len(options)))]
