"""`ShapesDataset`: (image, caption) pairs of the shapes world, each a pure function of (seed, index)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sdlab.errors import ParameterError
from sdlab.shapes.captions import caption
from sdlab.shapes.render import render
from sdlab.shapes.world import OBJECT_COUNT_WEIGHTS, SPLITS, TRAIN_STREAM, Scene, sample_scene


@dataclass(frozen=True)
class ShapesMix:
    """What the dataset shows how often: scenes of 1, 2 and 3 shapes in the ratio `object_weights`, and of
    the two-shape scenes a share `relation_share` captioned by a relation ("a red circle above a blue
    square"), the rest by a list of the shapes. The defaults are the world's own mix; a fine-tuning stage
    can lean towards what a model finds hard without changing the world."""

    object_weights: tuple[float, float, float] = OBJECT_COUNT_WEIGHTS
    relation_share: float = 0.5

    def __post_init__(self):
        weights = tuple(self.object_weights)
        numbers = all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
        if len(weights) != 3 or not numbers or sum(weights) <= 0:
            raise ParameterError(f"ShapesMix: object_weights={self.object_weights!r} must be three non-negative "
                                 "numbers (the weights of 1, 2 and 3 shapes) with a positive sum")
        if not isinstance(self.relation_share, (int, float)) or not 0 <= self.relation_share <= 1:
            raise ParameterError(f"ShapesMix: relation_share={self.relation_share!r} must lie in [0, 1]")

    @property
    def object_probabilities(self) -> tuple[float, float, float]:
        total = sum(self.object_weights)
        return tuple(w / total for w in self.object_weights)


class ShapesDataset:
    """An indexable, endless-in-practice dataset of rendered scenes with captions.

    Item i depends only on (seed, split, i), so any worker can produce any shard without coordination
    (e.g. rank r of w takes indices r, r + w, r + 2w, ...). Images are (size, size, 3) uint8 arrays.
    """

    def __init__(
        self, seed: int = 0, length: int = 1_000_000, size: int = 64, split: str = "train", mix: ShapesMix = ShapesMix()
    ):
        if length < 1:
            raise ParameterError(f"ShapesDataset: length={length} must be at least 1")
        if split not in SPLITS:
            raise ParameterError(f"ShapesDataset: split={split!r} is not one of {SPLITS}")
        self.seed, self.length, self.size, self.split, self.mix = seed, length, size, split, mix

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset: index {index} is outside [0, {self.length})")
        return np.random.default_rng([TRAIN_STREAM, self.seed, SPLITS.index(self.split), index])

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        return sample_scene(rng, self.split, object_weights=self.mix.object_probabilities)

    def scene(self, index: int) -> Scene:
        """The ground-truth scene of item `index`."""
        return self._draw_scene(self._rng(index))

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        rng = self._rng(index)
        scene = self._draw_scene(rng)
        return np.asarray(render(scene, self.size)), caption(scene, rng, relation_share=self.mix.relation_share)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        return (self[i] for i in range(self.length))
