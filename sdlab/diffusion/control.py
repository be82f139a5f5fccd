"""Control networks inside the denoiser: what each evaluation of the UNet gets added (see sdlab.nn.unet's
`ControlResiduals`, the UNet's one hook for them).

A `BoundControl` is one control unit bound to a batch: its network (a ControlNet, run on every evaluation
on the same inputs as the UNet, or a T2I-Adapter, whose features depend on the control image only and are
computed once when binding), its per-sample weights and its place in the sampling run. It lives in
`Conditioning.control`, so that classifier-free guidance batches it with the rest of the conditioning:

    controls = (BoundControl(...), ...)                       # one per unit, over the B samples
    cond = cond.replace(control=controls)                     # the uncond half gets weight 0 in some modes
    residuals = control_residuals(cond.control, x_in, t, sigma, cond.context, cond.added)
    unet(x_in, t, context, added=..., control=residuals)      # what conditioning.run_network does

The rules, and where they come from:
- the step window (diffusers' control_guidance_start / _end): run step i of N is steered when
  i / N >= start and (i + 1) / N <= end; the step of an evaluation is the one whose sigma interval holds it
  (second-order samplers' extra evaluations belong to their step);
- the weights: `scale` times, per residual, 1 ("balanced"), or soft scales rising to 1 at the middle block
  (A1111's "My prompt is more important" / "ControlNet is more important": 0.825 ** (K - k) for skip k of
  K; diffusers' guess mode: logspace(-1, 0, K + 1); T2I-Adapters in A1111's soft modes: 0.25, 0.62, 0.825, 1);
- which samples: "ControlNet is more important", guess mode and globally pooled ControlNets (shuffle) steer
  only the conditional half of a CFG batch (A1111's cfg_injection; diffusers runs the net on that half
  only); the net is then run on the steered samples alone. Several units sum their residuals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sdlab.nn.controlnet import ControlNet
from sdlab.nn.unet import ControlResiduals

SOFT_SCALES = (None, "a1111", "guess")
ADAPTER_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's T2I-Adapter soft injection


@dataclass(frozen=True)
class BoundControl:
    """One control unit over a batch of B samples.

    net: a ControlNet, or a T2I-Adapter (then `inputs` are its features, computed when binding).
    inputs: (hint,) for a ControlNet, the control image (B, C, H, W) at the image's size; the adapter's
        features, each (B, C_k, h_k, w_k).
    weight: (B,) per-sample factor: 1 for the samples the unit steers, 0 for those it leaves alone.
    sigmas: the run's noise levels (N + 1, descending), to tell which step an evaluation belongs to.
    """

    net: nn.Module
    inputs: tuple[torch.Tensor, ...]
    weight: torch.Tensor
    sigmas: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    soft: str | None = None

    @staticmethod
    def cat(parts: list[BoundControl]) -> BoundControl:
        """The same unit over several batches joined (classifier-free guidance's [uncond; cond])."""
        inputs = tuple(torch.cat(group) for group in zip(*(p.inputs for p in parts), strict=True))
        return dataclasses.replace(parts[0], inputs=inputs, weight=torch.cat([p.weight for p in parts]))

    def chunk(self, n: int) -> list[BoundControl]:
        groups = list(zip(*(x.chunk(n) for x in self.inputs), strict=True))
        weights = self.weight.chunk(n)
        return [dataclasses.replace(self, inputs=tuple(g), weight=w) for g, w in zip(groups, weights, strict=True)]

    def active(self, sigma: torch.Tensor) -> bool:
        """Whether the run's step that `sigma` (B,) belongs to is inside [start, end] (diffusers' rule)."""
        steps = len(self.sigmas) - 1
        level = float(sigma.max())
        # The last step i with sigmas[i] >= level (descending): an evaluation between two levels, e.g. a second-
        # order sampler's, belongs to the step it is part of; one above sigmas[0] (churn) to the first.
        i = max(int((self.sigmas[:-1] >= level * (1 - 1e-6)).sum()) - 1, 0)
        return not (i / steps < self.start or (i + 1) / steps > self.end)

    def residuals(self, x_in, t, sigma, context, added) -> ControlResiduals | None:
        """This unit's residuals for one UNet evaluation (B samples), weighted; None when it is idle."""
        weight = self.weight * self.scale  # (B,)
        rows = weight.nonzero().flatten()
        if len(rows) == 0 or not self.active(sigma):
            return None
        if isinstance(self.net, ControlNet):
            every = len(rows) == len(weight)
            pick = (lambda v: v) if every else (lambda v: None if v is None else v[rows])
            raw = self.net(pick(x_in), pick(t), pick(context), pick(self.inputs[0]), pick(added))
            skips = [*raw.skips, raw.middle]
        else:
            every, skips = True, list(self.inputs)
        scales = self._soft_scales(len(skips))
        weighted = [_weighted(r, weight if every else weight[rows], s) for r, s in zip(skips, scales)]
        if not every:
            weighted = [_scatter(r, rows, len(weight)) for r in weighted]
        if isinstance(self.net, ControlNet):
            return ControlResiduals(skips=tuple(weighted[:-1]), middle=weighted[-1])
        return ControlResiduals(encoder=tuple(weighted))

    def _soft_scales(self, n: int) -> list[float]:
        if self.soft is None or (isinstance(self.net, ControlNet) and self.net.cfg.global_pool):
            return [1.0] * n
        if not isinstance(self.net, ControlNet):
            return list(ADAPTER_SOFT_SCALES[-n:]) if n <= len(ADAPTER_SOFT_SCALES) else [1.0] * n
        if self.soft == "guess":
            return torch.logspace(-1, 0, n).tolist()  # float32 as diffusers computes them
        return [0.825 ** (n - 1 - k) for k in range(n)]


def _weighted(r: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    return r * (weight.to(r.dtype) * scale).view(-1, *([1] * (r.ndim - 1)))


def _scatter(r: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(len(rows), ...) -> (batch, ...) with zeros in the other rows."""
    full = r.new_zeros((batch, *r.shape[1:]))
    full[rows] = r
    return full


def control_residuals(controls, x_in, t, sigma, context, added) -> ControlResiduals | None:
    """The sum of every unit's residuals for one UNet evaluation; None when none is active."""
    total = None
    for control in controls:
        r = control.residuals(x_in, t, sigma, context, added)
        if r is not None:
            total = r if total is None else total + r
    return total
