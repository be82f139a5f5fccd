"""What is trained and how a batch becomes a loss: `DiffusionTask` (UNet, text encoder or LoRA) and `VAETask`.

The trainer's loop is the same for both; a task supplies
- `objective`: the nn.Module whose forward returns (loss, metrics), which DDP wraps;
- `trained`: the modules whose state a checkpoint holds (`frozen`: the rest, fingerprinted only);
- `draw(generator, batch, pixel_shape)`: every random number of a global micro-batch (sliced per process);
- `inputs(batch, noise, step)`: the objective's arguments for this process's share;
- `export(folder, layouts)` and `evaluate()`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..diffusion.schedules import NoiseSchedule
from ..families import family_of, latent_format
from ..lora import LoRANetwork, inject_lora
from ..model import Model
from .config import TrainConfig
from .diffusion import DiffusionObjective, draw_noise
from .latents import LatentCache
from .vae import VAEObjective, discriminator_layers, latent_scaling_factor, psnr

log = logging.getLogger(__name__)


def _train(module: nn.Module) -> nn.Module:
    return module.requires_grad_(True).train()


class DiffusionTask:
    """Text-to-image diffusion on the frozen VAE's latents."""

    def __init__(self, config: TrainConfig, model: Model, cache: LatentCache | None = None):
        self.config, self.model, self.cache = config, model, cache
        self.schedule = NoiseSchedule.from_config(model.config.schedule)
        self.lora: LoRANetwork | None = None
        self.family = family_of(model.config)
        text_encoders = {name: model.components[name] for name in self.family.text_encoders}
        if config.uses_lora:
            self.lora = inject_lora(model, config.lora_rank, config.lora_alpha, text_encoder=config.lora_text_encoder)
            self.trained = {"lora": self.lora}
        else:
            self.trained = {"unet": _train(model.unet)}
            if config.train_text_encoder:  # every text encoder of the family (SDXL: both)
                self.trained.update({name: _train(net) for name, net in text_encoders.items()})
        self.frozen = {n: net for n, net in model.components.items() if n not in self.trained}
        grad_through_text = config.train_text_encoder or (config.uses_lora and config.lora_text_encoder)
        self.objective = DiffusionObjective(
            model.unet, self.family, text_encoders, self.schedule, model.config.prediction,
            min_snr_gamma=config.min_snr_gamma, train_text_encoder=grad_through_text, extra=self.lora,
        )

    def latent_shape(self, pixel_shape) -> tuple[int, int, int]:
        f = self.model.config.vae.downscale
        return (latent_format(self.model.config).channels, pixel_shape[-2] // f, pixel_shape[-1] // f)

    def draw(self, generator: torch.Generator, batch: int, pixel_shape):
        return draw_noise(generator, batch, self.latent_shape(pixel_shape), self.schedule.num_timesteps,
                          offset_noise=self.config.offset_noise, caption_dropout=self.config.caption_dropout)

    def inputs(self, batch: dict, noise, step: int) -> tuple:
        device = self.model.device
        latents = self._latents(batch, noise.posterior.to(device))
        captions = ["" if drop else text for text, drop in zip(batch["caption"], noise.drop_caption.tolist())]
        # Per-sample extra conditions (SDXL: original size, crop) where the data source gives them.
        conditions = self.family.conditioner_inputs(self.model, captions, batch.get("conditions"))
        return latents, conditions, noise.timesteps.to(device), noise.noise.to(device, latents.dtype)

    @torch.no_grad()
    def _latents(self, batch: dict, posterior: torch.Tensor) -> torch.Tensor:
        """Scaled x_0 latents (B, C, h, w): z ~ q(z | x) from the posterior, then the latent format's scaling."""
        if self.cache is not None:
            mean, logvar = (t.to(posterior.device) for t in self.cache.get(batch["index"]))
        else:
            vae = self.model.vae
            mean, logvar = vae.encode(batch["pixels"].to(posterior.device, next(vae.parameters()).dtype))
        z = mean.float() + torch.exp(0.5 * logvar.float()) * posterior
        return latent_format(self.model.config).to_diffusion(z).to(self.model.dtype)

    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self, folder: Path, layouts, model: Model | None = None) -> list[Path]:
        """The LoRA file, or the model in each layout (`model`: what to write instead of the trained one,
        e.g. plain copies of sharded networks)."""
        if self.lora is not None:
            return [self.lora.save(folder / "lora.safetensors")]
        return _save_model(model or self.model, folder, layouts)


class VAETask:
    """The KL autoencoder on pixels, with PSNR on held-out images."""

    def __init__(self, config: TrainConfig, model: Model, eval_pixels: torch.Tensor | None = None):
        self.config, self.model, self.eval_pixels = config, model, eval_pixels
        self.objective = VAEObjective(_train(model.vae), recon_loss=config.recon_loss, kl_weight=config.kl_weight,
                                      disc_weight=config.disc_weight,
                                      disc_layers=discriminator_layers(config.resolution))
        self.trained = {"vae": model.vae}
        if self.objective.discriminator is not None:
            self.objective.discriminator.to(model.device)
            self.trained["discriminator"] = self.objective.discriminator
        self.frozen = {n: net for n, net in model.components.items() if n != "vae"}

    def draw(self, generator: torch.Generator, batch: int, pixel_shape):
        f = self.model.config.vae.downscale
        shape = (batch, self.model.config.vae.latent_channels, pixel_shape[-2] // f, pixel_shape[-1] // f)
        return _Rows(torch.randn(shape, generator=generator))

    def inputs(self, batch: dict, noise, step: int) -> tuple:
        device = self.model.device
        pixels = batch["pixels"].to(device, self.model.dtype)
        return pixels, noise.tensor.to(device, pixels.dtype), step >= self.config.disc_start

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_pixels is None:
            return {}
        was_training = self.model.vae.training
        self.model.vae.eval()
        value = psnr(self.model.vae, self.eval_pixels.to(self.model.device, self.model.dtype))
        self.model.vae.train(was_training)
        return {"psnr": value}

    def export(self, folder: Path, layouts) -> list[Path]:
        if self.eval_pixels is not None:
            # Diffusion on these latents wants unit variance: set the scaling factor as SD did.
            factor = latent_scaling_factor(self.model.vae, self.eval_pixels.to(self.model.device, self.model.dtype))
            vae_cfg = replace(self.model.config.vae, scaling_factor=round(factor, 5))
            self.model.config = self.model.config.replace(vae=vae_cfg)
            log.info("VAE latent scaling_factor set to %.5f", vae_cfg.scaling_factor)
        return _save_model(self.model, folder, layouts)


class _Rows:
    """A single tensor of draws that slices like `StepNoise`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def rows(self, start: int, stop: int) -> _Rows:
        return _Rows(self.tensor[start:stop])


def _save_model(model: Model, folder: Path, layouts) -> list[Path]:
    paths = []
    for layout in layouts:
        target = folder / ("model" if layout == "diffusers" else "model.safetensors")
        paths.append(model.save(target, layout=layout, overwrite=True))
    return paths
