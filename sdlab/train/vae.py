"""Training the KL autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G; Kingma & Welling 2014).

    loss = mean |x - D(z)| (or squared)  +  kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)
           [+ disc_weight * hinge generator loss, after `disc_start` steps]

The KL term is summed over latent elements and, like the reconstruction term, divided by the number of image
elements, so `kl_weight` means what it means in the LDM configs (1e-6): there both terms are sums over
elements. The optional adversarial term uses a PatchGAN discriminator (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks") with the hinge loss (Lim & Ye 2017), as taming-
transformers does, but with a fixed weight rather than its adaptive one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..nn.vae import VAE


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) -> (B, 1, H/2^n - 2, W/2^n - 2) real/fake logits, one per overlapping image patch.

    GroupNorm rather than pix2pix's BatchNorm: no running statistics to synchronise across processes.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, groups: int = 8):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            wider = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, wider, 4, stride, 1, bias=False), nn.GroupNorm(groups, wider), nn.LeakyReLU(0.2)]
            width = wider
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each sample's elements: (B, ...) -> (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(dim=1)


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    diff = recon.float() - pixels.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


class VAEObjective(nn.Module):
    """forward(pixels (B, 3, H, W) in [-1, 1], posterior noise (B, C, h, w), adversarial: bool)
        -> (loss, metrics). With a discriminator, its own hinge loss is part of `loss`: the generator term
    sees the discriminator's parameters detached and the discriminator term sees the reconstruction
    detached, so one backward pass trains both players on their own objectives."""

    def __init__(self, vae: VAE, *, recon_loss: str = "l1", kl_weight: float = 1e-6, disc_weight: float = 0.0,
                 disc_layers: int = 3):
        super().__init__()
        self.vae, self.recon_loss, self.kl_weight, self.disc_weight = vae, recon_loss, kl_weight, disc_weight
        self.discriminator = PatchDiscriminator(vae.cfg.out_channels, layers=disc_layers) if disc_weight > 0 else None

    def forward(self, pixels, posterior_noise, adversarial: bool = False):
        mean, logvar = self.vae.encode(pixels)
        recon = self.vae.decode(mean + torch.exp(0.5 * logvar) * posterior_noise.to(mean.dtype))
        rec = reconstruction_loss(recon, pixels, self.recon_loss)
        kl = kl_divergence(mean.float(), logvar.float()).mean() / pixels[0].numel()
        loss = rec + self.kl_weight * kl
        metrics = {"rec": rec.detach(), "kl": kl.detach()}
        if adversarial and self.discriminator is not None:
            gen, disc = self._adversarial(pixels, recon)
            loss = loss + self.disc_weight * gen + disc
            metrics.update(gen=gen.detach(), disc=disc.detach())
        return loss, metrics

    def _adversarial(self, pixels, recon) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        gen = -functional_call(self.discriminator, frozen, (recon,)).float().mean()
        real = self.discriminator(pixels).float()
        fake = self.discriminator(recon.detach()).float()
        disc = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return gen, disc


def discriminator_layers(resolution: int) -> int:
    """Downsampling layers that leave the patch logits a few pixels wide: 3 (pix2pix's 70x70 patches) from
    128 pixels up, fewer for small images."""
    return max(1, min(3, int(math.log2(resolution)) - 4))


@torch.no_grad()
def psnr(vae: VAE, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB) of reconstructions through the posterior mean, for images in [-1, 1] (peak-to-peak 2)."""
    mean, _ = vae.encode(pixels)
    recon = vae.decode(mean).float().clamp(-1, 1)
    mse = (recon - pixels.float()).pow(2).flatten(1).mean(dim=1).clamp(min=1e-10)  # (B,)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def latent_scaling_factor(vae: VAE, pixels: torch.Tensor) -> float:
    """1 / std of the posterior means: the `scaling_factor` giving diffusion unit-variance latents (as SD's
    0.18215 was chosen, Rombach et al. 2022 sec. G)."""
    mean, _ = vae.encode(pixels)
    std = float(mean.float().std())
    return 1.0 / std if std > 0 and math.isfinite(std) else 1.0
