"""`ShapesDataset`: (image, caption) pairs of the shapes world, each a pure function of (seed, index)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sdlab.errors import ParameterError
from sdlab.shapes.captions import caption
from sdlab.shapes.render import render
from sdlab.shapes.world import SPLITS, TRAIN_STREAM, Scene, sample_scene


class ShapesDataset:
    """An indexable, endless-in-practice dataset of rendered scenes with captions.

    Item i depends only on (seed, split, i), so any worker can produce any shard without coordination
    (e.g. rank r of w takes indices r, r + w, r + 2w, ...). Images are (size, size, 3) uint8 arrays.
    """

    def __init__(self, seed: int = 0, length: int = 1_000_000, size: int = 64, split: str = "train"):
        if length < 1:
            raise ParameterError(f"ShapesDataset: length={length} must be at least 1")
        if split not in SPLITS:
            raise ParameterError(f"ShapesDataset: split={split!r} is not one of {SPLITS}")
        self.seed, self.length, self.size, self.split = seed, length, size, split

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset: index {index} is outside [0, {self.length})")
        return np.random.default_rng([TRAIN_STREAM, self.seed, SPLITS.index(self.split), index])

    def scene(self, index: int) -> Scene:
        """The ground-truth scene of item `index`."""
        return sample_scene(self._rng(index), self.split)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        rng = self._rng(index)
        scene = sample_scene(rng, self.split)
        return np.asarray(render(scene, self.size)), caption(scene, rng)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        return (self[i] for i in range(self.length))
