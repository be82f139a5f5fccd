"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): an opt-in speedup that
trades a little quality for time.

From one sampling step to the next, a UNet's deep features (everything below its first level) change slowly,
while its first level, which sees the current latents at full resolution, is cheap. `DeepCacheUNet` runs the
whole UNet on every `interval`-th call and keeps its deep features, (B, C1, h, w); on the calls in between only
the first encoder level and the last decoder level run, with the kept features standing in for the rest.

    unet = DeepCacheUNet(model.unet, interval=3)   # calls 0, 3, 6, ... full; 1, 2, 4, 5, ... shallow
    out = unet(x, t, context)                      # same signature as UNet.forward

A fresh wrapper per image batch: the cache belongs to one sampling run. `GenerationParams.deepcache` sets it
up inside `sdlab.generate`. The cost in quality is measured in docs/performance.md.
"""

from __future__ import annotations

import torch
from torch import nn

from sdlab.errors import ParameterError
from sdlab.nn.unet import UNet


class DeepCacheUNet(nn.Module):
    def __init__(self, unet: UNet, interval: int):
        super().__init__()
        if interval < 1:
            raise ParameterError(f"deepcache interval must be >= 1 (1 = off: every step runs the whole UNet), "
                                 f"got {interval}")
        # torch.compile wraps the UNet; the cache needs the UNet's own method, so unwrap (runs uncompiled).
        self.unet = getattr(unet, "_orig_mod", unet)
        self.interval = interval
        self.calls = 0
        self.deep: torch.Tensor | None = None  # (B, C1, h, w) from the last full call

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, **inputs) -> torch.Tensor:
        """As the UNet's forward; `inputs` are the conditioning's other parts (`Conditioning.network_inputs`)."""
        reuse = self.deep is not None and self.calls % self.interval != 0 and self.deep.shape[0] == x.shape[0]
        out, deep = self.unet.forward_with_features(x, t, context, deep=self.deep if reuse else None, **inputs)
        self.deep = deep
        self.calls += 1
        return out
