"""Weight patching: give layers other weights for a while, then their originals back, bit for bit.

Every adapter that changes weights (a LoRA merge) goes through here, never through `layer.weight` itself,
because a layer need not hold its weight as a plain parameter: `sdlab.perf`'s packed layers keep only
oneDNN's blocked copy, and their `.weight` is a temporary unpacked tensor, so writing into it would change
nothing. Such a layer says how to replace its weight (`set_weight`, the `OwnsWeight` protocol); any other
layer has its parameter overwritten in place, which keeps the parameter's identity (optimizers, tied weights).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ParameterError


@runtime_checkable
class OwnsWeight(Protocol):
    """A layer that stores its weight its own way: `.weight` reads it (maybe as a copy), `set_weight`
    replaces it (taking the tensor, not copying it)."""

    def set_weight(self, weight: torch.Tensor) -> None: ...


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's current weight (out, in[, kh, kw]); not to be written into (it may be a copy)."""
    return layer.weight.detach()


@torch.no_grad()
def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Make `weight` the layer's weight (same shape and dtype as the current one)."""
    if isinstance(layer, OwnsWeight):
        layer.set_weight(weight)
    else:
        layer.weight.copy_(weight)


class WeightPatches:
    """Layers whose weight was replaced, with their exact originals; `restore()` puts those back.

    Patches stack: a second `WeightPatches` over the same layers keeps the first one's result as its
    original, so restore them in reverse order of patching.
    """

    def __init__(self) -> None:
        self._originals: dict[nn.Module, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._originals)

    def replace(self, layer: nn.Module, weight: torch.Tensor) -> None:
        current = read_weight(layer)
        if weight.shape != current.shape or weight.dtype != current.dtype:
            raise ParameterError(f"a patched weight must keep the layer's shape {tuple(current.shape)} and dtype "
                                 f"{current.dtype}, got {tuple(weight.shape)} {weight.dtype}")
        if layer not in self._originals:  # the first replacement keeps the true original
            self._originals[layer] = current.clone()
        write_weight(layer, weight)

    def restore(self) -> None:
        for layer, original in self._originals.items():
            write_weight(layer, original)
        self._originals.clear()

