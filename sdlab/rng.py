"""Gaussian noise from explicit generators: the one place sdlab draws random numbers for sampling.

A generator may be a single `torch.Generator` (the whole batch is drawn at once) or a list of them, one per
batch element (element i is drawn from generator i alone). The list form is what makes image i of a batch
with seed s reproducible on its own as seed s + i; both forms draw exactly as diffusers' `randn_tensor`.
"""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generator, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) of `shape`, drawn on the generator's device and moved to `device`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device=device, dtype=dtype) for g in generator])
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def generators(seeds: list[int], device="cpu") -> list[torch.Generator]:
    """One generator per seed (CPU by default, so that results do not depend on the accelerator)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]
