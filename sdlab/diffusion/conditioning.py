"""What the denoising network is conditioned on: one object, built by the model family's conditioner.

    cond, uncond = family.condition(model, prompts, negatives, params)   # Conditioning(context=(B, T, D), ...)
    both = batch_for_guidance(uncond, cond)               # the one place a CFG batch is assembled
    run_network(unet, x_in, t, both)                      # how every caller hands it to the network

Fields a family does not use are None. SD 1.x/2.x condition on the cross-attention context only (plus the
concatenated mask channels of inpainting models); SDXL adds a pooled text embedding and six size/crop
numbers as `added`; control units (ControlNet, T2I-Adapter: `sdlab.diffusion.control.BoundControl`) go
in `control`, and the denoiser turns them into the UNet's residuals at every evaluation. As in Stability's `sgm` GeneralConditioner,
each part is merged by its role, so a new kind of conditioning is a new field rather than a new argument
threaded through every signature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sdlab.diffusion.control import BoundControl
from sdlab.errors import ParameterError
from sdlab.nn.unet import ControlResiduals


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of a batch of B samples."""

    context: torch.Tensor  # (B, T, D) cross-attention context: text encoder hidden states
    added: torch.Tensor | None = None  # (B, N) a vector added to the time embedding (SDXL: pooled + sizes)
    concat: torch.Tensor | None = None  # (B, C, h, w) extra input channels (inpainting: mask + masked image)
    control: tuple[BoundControl, ...] | None = None  # control units (ControlNet, T2I-Adapter), in order

    def __len__(self) -> int:
        return self.context.shape[0]

    def replace(self, **changes) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def network_inputs(self) -> dict[str, object]:
        """What the network takes beyond (x, t, context) and the control residuals: the parts that are set."""
        return {} if self.added is None else {"added": self.added}

    def chunk(self, n: int) -> list[Conditioning]:
        """Split into `n` equal batches (the inverse of `cat`)."""
        parts = {name: _chunk(getattr(self, name), n) for name in _FIELDS}
        return [Conditioning(**{name: parts[name][i] for name in _FIELDS}) for i in range(n)]


_FIELDS = tuple(f.name for f in dataclasses.fields(Conditioning))


def cat(conditionings: Sequence[Conditioning]) -> Conditioning:
    """The conditionings of several batches as one batch: every field concatenated along the batch axis."""
    merged = {}
    for name in _FIELDS:
        values = [getattr(c, name) for c in conditionings]
        if all(v is None for v in values):
            merged[name] = None
        elif any(v is None for v in values):
            raise ParameterError(f"Conditioning.{name} is set in some of the batches to join but not in all")
        elif name == "control":
            merged[name] = tuple(BoundControl.cat(list(parts)) for parts in zip(*values, strict=True))
        else:
            merged[name] = torch.cat(values)
    return Conditioning(**merged)


def batch_for_guidance(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """The batch [uncond; cond] (2B) that classifier-free guidance runs through the network in one call."""
    return cat([uncond, cond])


def split_guidance(both: Conditioning, guided: bool) -> tuple[Conditioning, Conditioning | None]:
    """A conditioner's output for [negatives; prompts] (2B, when `guided`) or prompts alone (B) ->
    (cond, uncond); uncond is None without guidance. The inverse of `batch_for_guidance`."""
    if not guided:
        return both, None
    uncond, cond = both.chunk(2)
    return cond, uncond


def run_network(network: Callable, x_in: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                control: ControlResiduals | None = None) -> torch.Tensor:
    """network(x_in (B, C, h, w), t (B,), context, **the other parts that are set, control=...) -> eps or v."""
    inputs = cond.network_inputs()
    if control is not None:
        inputs["control"] = control
    return network(x_in, t, cond.context, **inputs)


def _chunk(value, n: int):
    if value is None:
        return [None] * n
    if isinstance(value, tuple):  # control units: split each, regroup per batch
        return [tuple(parts) for parts in zip(*(v.chunk(n) for v in value), strict=True)]
    return list(value.chunk(n))
