"""A latent cache: every image encoded once by the frozen VAE, reused every epoch.

Stores the posterior's mean and log-variance (unscaled), not a sample, so each epoch still draws a fresh
z = mean + std * eps as uncached training does. Only valid for deterministic items (centre crops, no
flips). Saved as safetensors with a fingerprint of the VAE weights and the data, and reused when both match.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints.atomic import atomic_write
from ..nn.vae import VAE

log = logging.getLogger(__name__)


class LatentCache:
    def __init__(self, means: list[torch.Tensor], logvars: list[torch.Tensor]):
        self.means, self.logvars = means, logvars  # one (C, h, w) tensor each, per item

    def __len__(self) -> int:
        return len(self.means)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (B, C, h, w), of the items `indices` (all of one size)."""
        return torch.stack([self.means[i] for i in indices]), torch.stack([self.logvars[i] for i in indices])

    @classmethod
    @torch.no_grad()
    def build(cls, source, vae: VAE, *, batch_size: int = 16, device=None) -> LatentCache:
        n = len(source)
        means: list[torch.Tensor | None] = [None] * n
        logvars: list[torch.Tensor | None] = [None] * n
        for indices in _same_size_batches(source, batch_size):
            pixels = torch.stack([source.load(i)["pixels"] for i in indices]).to(device)
            mean, logvar = vae.encode(pixels.to(next(vae.parameters()).dtype))
            for row, i in enumerate(indices):
                means[i], logvars[i] = mean[row].float().cpu().clone(), logvar[row].float().cpu().clone()
        log.info("encoded %d images into the latent cache", n)
        return cls(means, logvars)

    def save(self, path: str | Path, fingerprint: str) -> None:
        tensors = {f"mean.{i}": m for i, m in enumerate(self.means)}
        tensors.update({f"logvar.{i}": v for i, v in enumerate(self.logvars)})
        with atomic_write(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "count": str(len(self))})

    @classmethod
    def load(cls, path: str | Path, fingerprint: str) -> LatentCache | None:
        """The cache in `path` if it exists and was built from the same VAE and data, else None."""
        path = Path(path)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                log.info("%s was built from other weights or data; rebuilding it", path)
                return None
            count = int(meta["count"])
            return cls([f.get_tensor(f"mean.{i}") for i in range(count)],
                       [f.get_tensor(f"logvar.{i}") for i in range(count)])


def fingerprint(vae: VAE, source, resolution: int) -> str:
    """A digest of the VAE weights and the data description (items, sizes, paths) the cache depends on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(f"{type(source).__name__}:{len(source)}:{resolution}".encode())
    for record in getattr(source, "records", []):
        digest.update(f"{record.path}:{record.size}".encode())
    digest.update(repr(getattr(source, "sizes", None)).encode())
    shapes = getattr(source, "shapes", None)
    if shapes is not None:
        digest.update(f"{shapes.seed}:{shapes.split}:{shapes.size}:{shapes.mix!r}".encode())
    return digest.hexdigest()


def _same_size_batches(source, batch_size: int) -> list[list[int]]:
    sizes = getattr(source, "sizes", None)
    groups: dict = {}
    for i in range(len(source)):
        groups.setdefault(sizes[i] if sizes else None, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
